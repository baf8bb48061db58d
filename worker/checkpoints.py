"""Checkpoints on the worker's disk: `work_dir/checkpoints/step-N`, each written whole or not at all, the last
K plus the best kept, and the RNG states a resumed run needs to continue exactly where the killed one was.

A checkpoint holds the trained weights (as worker.model_setup.save_weights writes them) and the training state:
the optimizer, RNG states, data position and the run's progress so far (worker.train_loop). The state is kept
without pickle, which runs code on load: its tensors go to STATE_TENSORS (safetensors) and everything else to
STATE_FILE (JSON), whose tensors are {"$tensor": name} references into the other. Reading it back builds
nothing but tensors, dicts, lists, tuples, numbers, strings and None, whatever the files hold. (A directory of
an older version, with a pickled `training_state.pt`, is not a checkpoint here: it is neither listed nor read.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STATE_FILE = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
# Marks a checkpoint written because the job was paused, between two regular ones: it is resumed from like any
# other, but never published, judged or counted among the kept ones (the next regular checkpoint prunes it), so a
# paused run keeps the same checkpoints as an uninterrupted one.
PAUSE_MARKER = "training_state.paused"
STATE_FILES = (STATE_FILE, STATE_TENSORS, PAUSE_MARKER)
CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")


def save_atomically(dest: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling and rename it into place: `dest` is complete or absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def checkpoint_steps(work_dir: Path) -> list[int]:
    """Steps of the complete checkpoints under work_dir, ascending."""
    root = Path(work_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for path in root.iterdir():
        match = CHECKPOINT_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def kept_checkpoints(existing: Sequence[int], new: int, best: int | None, keep: int) -> list[int]:
    """The last `keep` checkpoint steps, plus the best one."""
    recent = sorted({*existing, new})[-keep:]
    return sorted(set(recent) | ({best} if best is not None else set()))


def is_pause_checkpoint(work_dir: Path, step: int) -> bool:
    return (checkpoint_dir(work_dir, step) / PAUSE_MARKER).is_file()


def regular_checkpoint_steps(work_dir: Path) -> list[int]:
    """checkpoint_steps without the pause checkpoints."""
    return [step for step in checkpoint_steps(work_dir) if not is_pause_checkpoint(work_dir, step)]


def checkpoint_dir(work_dir: Path, step: int) -> Path:
    return Path(work_dir) / "checkpoints" / f"step-{step}"


def save_checkpoint(work_dir: Path, step: int, kept: Sequence[int], write: Callable[[Path], None]) -> Path:
    """Checkpoint `step`, filled by `write`, then every checkpoint not in `kept` deleted."""
    path = save_atomically(checkpoint_dir(work_dir, step), write)
    for old in checkpoint_steps(work_dir):
        if old not in kept:
            shutil.rmtree(checkpoint_dir(work_dir, old), ignore_errors=True)
    return path


def save_pause_checkpoint(work_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """A pause checkpoint at `step`, filled by `write`; nothing pruned."""

    def write_marked(tmp: Path) -> None:
        write(tmp)
        (tmp / PAUSE_MARKER).write_text(f"paused after step {step}\n")

    return save_atomically(checkpoint_dir(work_dir, step), write_marked)


def write_state(path: Path, state: dict) -> None:
    """`state` (tensors, dicts, lists, tuples, numbers, strings, None) as STATE_TENSORS and STATE_FILE in `path`."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    document = _to_json(state, tensors)
    save_file(tensors, str(path / STATE_TENSORS))
    (path / STATE_FILE).write_text(json.dumps(document))


def read_state(path: Path) -> dict:
    """The state write_state wrote, its tensors on the CPU (the optimizer moves its own to its parameters)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / STATE_TENSORS), device="cpu")
    return _from_json(json.loads((path / STATE_FILE).read_text()), tensors)


# Markers of what JSON has no type for. A dict whose keys are not all strings, or one whose key starts with "$"
# (so that it cannot pass for a marker), is written as its items.
_TENSOR, _TUPLE, _ITEMS = "$tensor", "$tuple", "$items"


def _to_json(value: Any, tensors: dict[str, Any]) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().contiguous().clone()  # safetensors refuses tensors that share memory
        return {_TENSOR: name}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _to_json(v, tensors) for k, v in value.items()}
        return {_ITEMS: [[_to_json(k, tensors), _to_json(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"a training state cannot hold a {type(value).__name__}")


def _from_json(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((marker, inner),) = value.items()
        if marker == _TENSOR:
            return tensors[inner]
        if marker == _TUPLE:
            return tuple(_from_json(v, tensors) for v in inner)
        if marker == _ITEMS:
            return {_from_json(k, tensors): _from_json(v, tensors) for k, v in inner}
    return {k: _from_json(v, tensors) for k, v in value.items()}


def copy_weights(checkpoint: Path, dest: Path) -> None:
    """The checkpoint's weight files (all but its training state) into `dest`: linked where the volume allows
    (a checkpoint's files are never changed in place), else copied."""
    for item in checkpoint.iterdir():
        if item.is_file() and item.name not in STATE_FILES:
            try:
                os.link(item, dest / item.name)
            except OSError:
                shutil.copy2(item, dest / item.name)


def rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
