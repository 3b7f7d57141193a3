"""Trainer checkpoints: ``accelerator.save_state`` plus the trainer's own state, written atomically.

Layout of a run directory::

    <run>/config.yaml                  resolved config
    <run>/checkpoints/step_00000400/   accelerate state (models, optimiser, grad scaler, RNG) +
                                       trainer_state.pt (step, gamma and its Adam state, best metric,
                                       sampler seed; the samplers are stateless functions of the step)
    <run>/checkpoints/best/            the same, for the best validation metric so far
    <run>/export/{primary,auxiliary}.safetensors

A checkpoint is first written to ``checkpoints/.tmp-<name>`` by every process and then renamed into
place by the main process (``os.replace``), so a folder named ``step_*`` or ``best`` is always
complete: an interrupted save leaves only a ``.tmp-*`` folder, which is ignored and cleaned up.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CKPT_DIR",
    "TRAINER_STATE",
    "step_name",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_trainer_state",
    "atomic_torch_save",
]

CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1][1] if cks else None


def save_checkpoint(
    accelerator: Any,
    run_dir: str | os.PathLike,
    name: str,
    trainer_state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``name`` (``step_XXXXXXXX`` or ``best``); collective: call on every process.

    ``keep_last``: afterwards delete all but the newest ``keep_last`` step checkpoints.
    """
    ckdir = Path(run_dir) / CKPT_DIR
    final = ckdir / name
    tmp = ckdir / f".tmp-{name}"
    if accelerator.is_main_process:
        ckdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_torch_save(trainer_state, tmp / TRAINER_STATE)
        old = ckdir / f".old-{name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if keep_last is not None:
            for _, p in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    f = path / TRAINER_STATE if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a trainer checkpoint (no {TRAINER_STATE})")
    return torch.load(f, map_location="cpu", weights_only=False)


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Restore the accelerate state (models, optimiser, scaler, RNG) and return the trainer state."""
    state = read_trainer_state(path)
    accelerator.load_state(str(path))
    return state
