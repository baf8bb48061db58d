"""DPO at the API: preference files at upload (format, line-numbered errors) and dpo jobs at creation (the
method as OpenAI takes it, the data each method needs, what DPO refuses)."""

from __future__ import annotations

import copy

import pytest

from tests.api.test_files import jsonl, storage_tmp_files, upload
from tests.conftest import preference_rows, prompt_completion_rows

pytestmark = pytest.mark.usefixtures("database")

PAIR = preference_rows(1)[0]


def dpo(**hyperparameters) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def changed(path: str, value) -> dict:
    """PAIR with the value at a dotted path (list indices as numbers) replaced; None deletes it."""
    row = copy.deepcopy(PAIR)
    *parents, last = path.split(".")
    node = row
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key = int(last) if last.isdigit() else last
    if value is None:
        del node[key]
    else:
        node[key] = value
    return row


@pytest.fixture
def preference_file(client, auth) -> str:
    return upload(client, auth, jsonl(preference_rows(12))).json()["id"]


@pytest.fixture
def chat_file(client, auth) -> str:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 10
    return upload(client, auth, jsonl(rows)).json()["id"]


def create(client, auth, **body):
    return client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama-test"} | body)


def test_a_preference_file_is_recognised(client, auth):
    response = upload(client, auth, jsonl(preference_rows(12)))
    assert response.status_code == 200, response.text
    assert response.json()["format"] == "preference" and response.json()["n_examples"] == 12


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (changed("non_preferred_output", None), "line 4: missing key 'non_preferred_output'"),
        (changed("input", {"text": "x"}), "line 4: 'input' must be an object with 'messages'"),
        (changed("input.messages", []), "line 4: input.messages must be a non-empty list"),
        (changed("input.messages.0.role", "wizard"), "line 4: input.messages[0] has unknown role 'wizard'"),
        (changed("input.messages.0.content", 3), "line 4: input.messages[0] is missing key 'content'"),
        (changed("preferred_output", []), "line 4: 'preferred_output' must be a list of exactly one assistant"),
        (changed("preferred_output.0.role", "user"), "line 4: preferred_output[0] must have role 'assistant'"),
        (changed("non_preferred_output.0.content", None), "line 4: non_preferred_output[0] is missing key 'content'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "line 4: expected a preference example like line 1"),
    ],
)
def test_bad_preference_lines_are_named(client, auth, bad, expected):
    before = storage_tmp_files()
    rows = preference_rows(12)
    rows[3] = bad
    response = upload(client, auth, jsonl(rows))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(expected), error
    assert error["param"] == "file"
    assert client.get("/v1/files", headers=auth).json()["data"] == []
    assert storage_tmp_files() == before


def test_a_dpo_job_is_created_as_openai_shows_it(client, auth, preference_file):
    response = create(
        client,
        auth,
        training_file=preference_file,
        validation_file=preference_file,
        method=dpo(beta=0.25, n_epochs=2, batch_size=4),
        adapter={"type": "dora", "r": 4},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"] == {
        "type": "dpo",
        "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto", "beta": 0.25}},
    }
    # beta lives in the method: OpenAI's top-level hyperparameters type has only the three supervised ones.
    assert set(job["hyperparameters"]) == {"n_epochs", "batch_size", "learning_rate_multiplier"}
    assert job["adapter"]["type"] == "dora"

    auto = create(client, auth, training_file=preference_file, method={"type": "dpo"}).json()
    assert auto["method"]["dpo"]["hyperparameters"]["beta"] == 0.1  # OpenAI's "auto"


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"method": dpo(beta=0)}, "method.dpo.hyperparameters.beta", ""),
        ({"method": dpo(beta="high")}, "method.dpo.hyperparameters.beta", ""),
        ({"method": dpo(gamma=1)}, "method.dpo.hyperparameters.gamma", ""),
        ({"method": dpo(), "adapter": {"type": "full"}}, "adapter.type", "reference model"),
        ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised", "method.type is dpo"),
        ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo", "method.type is supervised"),
        ({"method": dpo(), "hyperparameters": {"n_epochs": 1}}, "hyperparameters", "method.dpo.hyperparameters"),
        ({"method": dpo(), "text_template": "{input}"}, "text_template", ""),
    ],
)
def test_bad_dpo_requests_name_the_field(client, auth, preference_file, body, param, says):
    response = create(client, auth, training_file=preference_file, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_each_method_takes_its_own_data(client, auth, preference_file, chat_file):
    training = upload(client, auth, jsonl(prompt_completion_rows(12))).json()["id"]
    for body, param, says in [
        ({"training_file": chat_file, "method": dpo()}, "training_file", "line 1 of the training_file"),
        ({"training_file": training, "method": dpo()}, "training_file", "is a prompt_completion example"),
        (
            {"training_file": preference_file, "validation_file": chat_file, "method": dpo()},
            "validation_file",
            "a dpo job needs preference examples",
        ),
        ({"training_file": preference_file}, "training_file", 'method {"type": "dpo"}'),
        ({"training_file": chat_file, "validation_file": preference_file}, "validation_file", "preference example"),
    ]:
        response = create(client, auth, **body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and says in error["message"], (body, error)


def test_a_dpo_job_continues_only_a_finished_job(client, auth, preference_file, chat_file):
    sft = create(client, auth, training_file=chat_file).json()
    response = create(client, auth, training_file=preference_file, method=dpo(), from_job=sft["id"])
    assert response.status_code == 400 and response.json()["error"]["param"] == "from_job"
