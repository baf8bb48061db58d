"""An imported base model, end to end on real processes (PostgreSQL, Redis, uvicorn, a Celery worker): an admin
uploads a Hugging Face directory as an archive, a project fine-tunes the new model, and once no job uses it the
admin deletes it."""

from __future__ import annotations

import uuid

import httpx
import redis

from tests.api.test_model_admin import TINY, archive, tiny_files
from tests.conftest import RUN_ID, Stack
from tests.e2e.helpers import sdk, upload_emotion, wait_for


def test_a_fine_tune_on_an_imported_model_succeeds(database, tmp_path):
    from api.services.keys import create_admin_key

    queue = f"grove-test-{RUN_ID}-import-{uuid.uuid4().hex[:6]}"
    stack = Stack(
        "import",
        {
            "GROVE_MODEL_STORE_DIR": str(tmp_path / "store"),
            "GROVE_MODEL_IMPORT_DIR": str(tmp_path / "import"),
            "GROVE_FINE_TUNE_QUEUE": queue,
            "GROVE_RUN_WEBHOOK_SENDER": "false",
        },
    ).start()
    try:
        with stack.session() as session:
            admin = {"Authorization": f"Bearer {create_admin_key(session)}"}
        name = f"imported-{uuid.uuid4().hex[:8]}"
        created = httpx.post(
            f"{stack.base_url}/v1/models",
            headers=admin,
            files={"file": ("model.tar.gz", archive(tiny_files()))},
            data={"name": name},
            timeout=120,
        )
        assert created.status_code == 200, created.text
        key = stack.new_key()
        client = sdk(stack.base_url, key)
        assert [m.id for m in client.models.list()] == [name]
        training = upload_emotion(client, tmp_path, 16)
        job = client.fine_tuning.jobs.create(
            model=name,
            training_file=training,
            extra_body={"text_template": "{text} -> {label}", "max_steps": 2, "adapter": {"r": 4, "alpha": 8}},
        )
        done = wait_for(client, job.id)
        assert done.status == "succeeded", (done.error, stack.log("worker.log"))
        assert done.fine_tuned_model == f"{name}:ft:{job.id}" and done.trained_tokens > 0
        assert (tmp_path / "store" / name / "config.json").read_bytes() == (TINY / "config.json").read_bytes()
        deleted = httpx.delete(f"{stack.base_url}/v1/models/{name}", headers=admin, timeout=30)
        assert deleted.status_code == 200, deleted.text
        assert list(client.models.list()) == []
    finally:
        stack.stop()
        redis.Redis.from_url(stack.env["GROVE_BROKER_URL"]).delete(queue)
