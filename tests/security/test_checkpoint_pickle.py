"""Issue 16: no pickle in a checkpoint, on the worker's volume or in what users download.

A checkpoint's training state (optimizer, RNG states, progress) used to be `training_state.pt`, read back with
`torch.load(weights_only=False)`: whoever could write to the work volume could run code in the worker, and every
downloaded checkpoint archive shipped that pickle to users. The state is now safetensors plus JSON, which load
into tensors and plain values only, and published archives hold the adapter alone.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from tests.worker.test_train import RecordingHooks, chat_examples, make_spec
from worker.checkpoints import STATE_FILE, STATE_TENSORS, checkpoint_dir, checkpoint_steps, read_state
from worker.tasks import run_job
from worker.train import train_adapter

# safetensors refuses a file that is not safetensors; json one that is not JSON (or not even UTF-8).
REFUSED = (SafetensorError, ValueError)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


class WritesAFile:
    """Unpickling this writes `path`: what a crafted state would do, with a visible trace instead of harm."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "code ran"))


def crafted_state(path: Path, marker: Path) -> Path:
    """A training_state.pt as torch.save writes one, holding the payload."""
    torch.save({"step": 2, "optimizer": WritesAFile(marker)}, path)
    return path


@pytest.fixture
def trained(tiny_model, tmp_path) -> Path:
    """A work directory with real checkpoints at steps 1 and 2 (step 1 is the one resumed from below)."""
    spec = make_spec(max_steps=2, save_every_steps=1, keep_checkpoints=2)
    train_adapter(spec, tiny_model, chat_examples(8), None, tmp_path / "work", RecordingHooks())
    shutil.rmtree(checkpoint_dir(tmp_path / "work", 2))  # so that a rerun resumes from step 1
    assert checkpoint_steps(tmp_path / "work") == [1]
    return tmp_path / "work"


def test_the_payload_would_run_under_the_old_loader(tmp_path):
    """The threat is real: the old `torch.load(weights_only=False)` runs the payload."""
    marker = tmp_path / "marker"
    torch.load(crafted_state(tmp_path / "training_state.pt", marker), weights_only=False)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("placed_as", [STATE_TENSORS, STATE_FILE])
def test_a_crafted_pickle_in_place_of_the_state_is_refused_and_runs_nothing(trained, tiny_model, placed_as):
    marker = trained.parent / "marker"
    step = checkpoint_dir(trained, 1)
    crafted_state(step / placed_as, marker)
    with pytest.raises(REFUSED):
        read_state(step)
    assert not marker.exists()
    # The resuming run reads the same files: it fails, and runs nothing either.
    spec = make_spec(max_steps=2, save_every_steps=1, keep_checkpoints=2)
    with pytest.raises(REFUSED):
        train_adapter(spec, tiny_model, chat_examples(8), None, trained, RecordingHooks())
    assert not marker.exists()


def test_a_pickled_state_of_the_old_format_is_never_loaded(trained, tiny_model):
    """A checkpoint directory holding `training_state.pt` (an older version's, or an attacker's) is not a
    checkpoint: the run starts over instead of unpickling it."""
    marker = trained.parent / "marker"
    step = checkpoint_dir(trained, 1)
    for name in (STATE_FILE, STATE_TENSORS):
        (step / name).unlink()
    crafted_state(step / "training_state.pt", marker)
    assert checkpoint_steps(trained) == []
    hooks = RecordingHooks()
    spec = make_spec(max_steps=2, save_every_steps=1, keep_checkpoints=2)
    outcome = train_adapter(spec, tiny_model, chat_examples(8), None, trained, hooks)
    assert outcome.resumed_from is None and outcome.steps == 2
    assert not marker.exists()


def test_the_state_is_json_and_safetensors_only(trained):
    step = checkpoint_dir(trained, 1)
    document = json.loads((step / STATE_FILE).read_text())
    assert document["step"] == 1 and "optimizer" in document
    state = read_state(step)
    assert isinstance(state["rng"]["torch"], torch.Tensor) and state["optimizer"]["state"]
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])  # the optimizer's keys stay ints
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    assert not [p for p in step.iterdir() if p.suffix in PICKLE_SUFFIXES]


# --- what users download -----------------------------------------------------------------------------------


def assert_no_pickle(archive: bytes) -> set[str]:
    """The archive's member names. Each is a kind of file that holds no code (JSON that parses, safetensors that
    load, text), and none is a pickle by name or by content (protocol 2+ starts with 0x80, torch.save's zip
    with PK)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for name, data in members.items():
        assert not name.endswith(PICKLE_SUFFIXES) and not data.startswith((b"\x80", b"PK\x03\x04")), name
        assert Path(name).suffix in {".json", ".safetensors", ".md", ".jinja", ".txt"}, name
        if name.endswith(".json"):
            json.loads(data)
        elif name.endswith(".safetensors"):
            load_safetensors(data)
        else:
            data.decode()
    return set(members)


def test_downloaded_checkpoints_and_adapters_carry_no_pickle(tenant):
    body = tenant.base(text_template="{text} -> {label} (no pickle)", save_every_steps=1, keep_checkpoints=2)
    created = tenant.post("/v1/fine_tuning/jobs", body)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    assert run_job(job_id, "fine_tune") == "done"

    checkpoints = tenant.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert sorted(c["step_number"] for c in checkpoints) == [1, 2]
    job = tenant.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    for file_id in [c["file_id"] for c in checkpoints] + [job["result_files"][0]]:
        download = tenant.get(f"/v1/files/{file_id}/content")
        assert download.status_code == 200
        names = assert_no_pickle(download.content)
        assert {"adapter_model.safetensors", "adapter_config.json", "grove-manifest.json"} <= names
        assert not any(name.startswith("training_state") for name in names)
