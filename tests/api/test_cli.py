from typer.testing import CliRunner

from api.cli import app

runner = CliRunner()


def test_keys_create_prints_a_working_key(client):
    result = runner.invoke(app, ["keys", "create", "--project", "cli-made"])
    assert result.exit_code == 0, result.output
    key = result.output.strip()
    assert key.startswith("grove-")
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # A second key for the same project sees the same project's objects.
    second = runner.invoke(app, ["keys", "create", "--project", "cli-made"]).output.strip()
    assert second != key
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {second}"}).status_code == 200


def test_bootstrap_writes_the_key_once(client, tmp_path):
    key_file = tmp_path / "api-key"
    first = runner.invoke(app, ["bootstrap", "--key-file", str(key_file), "--project", "boot"]).output.strip()
    assert key_file.read_text().strip() == first and (key_file.stat().st_mode & 0o777) == 0o600
    again = runner.invoke(app, ["bootstrap", "--key-file", str(key_file), "--project", "boot"]).output.strip()
    assert again == first
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {first}"}).status_code == 200
