"""Checkpoints on the worker's disk: `work_dir/checkpoints/step-N`, each written whole or not at all, the last
K plus the best kept, and the RNG states a resumed run needs to continue exactly where the killed one was.

A checkpoint holds the trained weights (as worker.model_setup.save_weights writes them) and STATE_FILE: the
optimizer, RNG states, data position and the run's progress so far (worker.train_loop).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

STATE_FILE = "training_state.pt"
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


def checkpoint_dir(work_dir: Path, step: int) -> Path:
    return Path(work_dir) / "checkpoints" / f"step-{step}"


def save_checkpoint(work_dir: Path, step: int, kept: Sequence[int], write: Callable[[Path], None]) -> Path:
    """Checkpoint `step`, filled by `write`, then every checkpoint not in `kept` deleted."""
    path = save_atomically(checkpoint_dir(work_dir, step), write)
    for old in checkpoint_steps(work_dir):
        if old not in kept:
            shutil.rmtree(checkpoint_dir(work_dir, old), ignore_errors=True)
    return path


def write_state(path: Path, state: dict) -> None:
    import torch

    torch.save(state, path / STATE_FILE)


def read_state(path: Path, device) -> dict:
    import torch

    return torch.load(path / STATE_FILE, map_location=device, weights_only=False)


def copy_weights(checkpoint: Path, dest: Path) -> None:
    """The checkpoint's weight files (all but its state) into `dest`."""
    for item in checkpoint.iterdir():
        if item.is_file() and item.name != STATE_FILE:
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
