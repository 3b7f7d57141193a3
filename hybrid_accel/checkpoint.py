"""Trainer checkpoints: ``accelerator.save_state`` plus the trainer's own state, written atomically.

Layout of a run directory::

    <run>/config.yaml                  resolved config
    <run>/checkpoints/step_00000400/   accelerate state (models, optimiser, grad scaler, RNG) +
                                       trainer_state.json + trainer_state.safetensors (step, best metric,
                                       sampler seed, ...; gamma and its Adam moments as tensors; the
                                       samplers are stateless functions of the step)
    <run>/checkpoints/best/            the same, for the best validation metric so far
    <run>/export/{primary,auxiliary}.safetensors

A checkpoint is first written to ``checkpoints/.tmp-<name>`` by every process and then renamed into
place by the main process (``os.replace``), so a folder named ``step_*`` or ``best`` is always
complete: an interrupted save leaves only a ``.tmp-*`` folder, which is ignored and cleaned up.

Loading a checkpoint never runs code from it (docs/safety.md). The trainer state is JSON plus a
safetensors file, and before ``accelerator.load_state`` reads a folder every pickle-based file in it
(``optimizer.bin``, ``random_states_*.pkl``, ...) must load with ``torch.load(weights_only=True)``, which
refuses anything but tensors, plain containers and numpy arrays. The same pass reads every file once,
so a truncated file is named before any state is touched. A ``trainer_state.pt`` from an older version
is a pickle: it is refused with a message; ``python -m hybrid_accel.checkpoint upgrade FOLDER``
converts it, again with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "CKPT_DIR",
    "TRAINER_STATE",
    "TRAINER_TENSORS",
    "LEGACY_TRAINER_STATE",
    "CheckpointError",
    "is_checkpoint",
    "verify_checkpoint",
    "resumable_checkpoint",
    "check_resume_target",
    "safe_torch_load",
    "write_trainer_state",
    "upgrade_legacy",
    "step_name",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_trainer_state",
]

CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
LEGACY_TRAINER_STATE = "trainer_state.pt"  # pickle, written before the JSON format; never unpickled
_TENSOR_KEY = "__tensor__"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (damaged, old format, unsafe); the message names the file."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_checkpoint(p):
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
        write_trainer_state(trainer_state, tmp)
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


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A folder with a trainer state, in the current format or the old pickle one (refused when read)."""
    p = Path(path)
    return (p / TRAINER_STATE).is_file() or (p / LEGACY_TRAINER_STATE).is_file()


# ------------------------------------------------------------------------------- trainer state
def _split_tensors(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by ``{"__tensor__": name}``; the tensors go to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR_KEY: key}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{key}.{k}" if key else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state at {key!r}: {type(obj).__name__} is not storable as JSON or a tensor")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_KEY}:
            name = obj[_TENSOR_KEY]
            if name not in tensors:
                raise CheckpointError(f"{where / TRAINER_TENSORS}: tensor {name!r} named in {TRAINER_STATE} is missing")
            return tensors[name]
        return {k: _join_tensors(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors, where) for v in obj]
    return obj


def write_trainer_state(state: dict[str, Any], folder: str | os.PathLike) -> None:
    """``folder/trainer_state.json`` (plain values) + ``folder/trainer_state.safetensors`` (tensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    plain = _split_tensors(state, "", tensors)
    tmp = folder / f".{TRAINER_TENSORS}.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / TRAINER_TENSORS)
    tmp = folder / f".{TRAINER_STATE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(plain, indent=1))  # Python's JSON keeps -inf (best before any validation)
    os.replace(tmp, folder / TRAINER_STATE)


def _legacy_message(f: Path) -> str:
    return (f"{f}: trainer state in the old pickle format; it is not loaded, because unpickling a file can "
            "run code from it. If you trust this checkpoint, convert it (tensors and plain values only) with: "
            f"python -m hybrid_accel.checkpoint upgrade {f.parent}")


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a checkpoint folder (or its ``trainer_state.json``); never unpickles."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    f = folder / TRAINER_STATE
    if not f.is_file():
        if (folder / LEGACY_TRAINER_STATE).is_file():
            raise CheckpointError(_legacy_message(folder / LEGACY_TRAINER_STATE))
        raise FileNotFoundError(f"{path}: not a trainer checkpoint (no {TRAINER_STATE})")
    try:
        plain = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: damaged or truncated ({type(e).__name__}: {e})") from e
    t = folder / TRAINER_TENSORS
    tensors: dict[str, torch.Tensor] = {}
    if t.is_file():
        try:
            tensors = load_file(str(t), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{t}: damaged or truncated ({e})") from e
    if not isinstance(plain, dict):
        raise CheckpointError(f"{f}: not a trainer state (a JSON object was expected)")
    return _join_tensors(plain, tensors, folder)


# ---------------------------------------------------------------------- pickles (accelerate's)
def _numpy_safe_globals() -> list[Any]:
    """What accelerate's RNG file needs besides tensors: numpy arrays and dtypes (no code)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)]
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


def safe_torch_load(f: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` that can only rebuild tensors, plain containers and numpy arrays: never runs code."""
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return torch.load(f, map_location=map_location, weights_only=True)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError naming the first file of the folder that is damaged or unsafe to load.

    Reads the trainer state, opens every safetensors file (its header must cover the file) and loads
    every pickle-based file with ``weights_only=True``; accelerate's ``load_state`` reads only these.
    """
    from safetensors import safe_open

    folder = Path(path)
    read_trainer_state(folder)
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        st.get_slice(k)
            except Exception as e:
                raise CheckpointError(f"{f}: damaged or truncated ({e})") from e
        elif f.suffix in (".bin", ".pkl", ".pt", ".pth") and f.name != LEGACY_TRAINER_STATE:
            try:
                safe_torch_load(f)
            except Exception as e:
                unsafe = "Unsupported global" in str(e) or "weights_only" in str(e).lower()
                why = ("holds objects other than tensors and plain values; it is not loaded, because "
                       "unpickling it could run code" if unsafe else f"damaged or truncated ({type(e).__name__})")
                raise CheckpointError(f"{f}: {why}") from None


def resumable_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest step checkpoint of a run that verifies, and a note for each newer damaged one."""
    notes: list[str] = []
    for _, p in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            notes.append(f"skipping checkpoint {p.name}: {e}")
            continue
        if notes:
            notes.append(f"resuming from the previous complete checkpoint {p}")
        return p, notes
    return None, notes


def check_resume_target(path: str | os.PathLike) -> str | None:
    """None if ``path`` can be resumed from, else a message naming the bad file and an older checkpoint."""
    path = Path(path)
    try:
        verify_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as e:
        older = None
        m = _STEP_RE.match(path.name)
        if m:
            for s, p in reversed(list_checkpoints(path.parent.parent)):
                if s < int(m.group(1)):
                    try:
                        verify_checkpoint(p)
                    except (CheckpointError, FileNotFoundError):
                        continue
                    older = p
                    break
        return f"resume={path}: {e}" + (f"; the previous complete checkpoint is {older}: resume with "
                                         f"resume={older}" if older else "")
    return None


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Restore the accelerate state (models, optimiser, scaler, RNG) and return the trainer state.

    Every file is verified first (``verify_checkpoint``), so nothing is restored from a folder
    with a damaged or unsafe file.
    """
    verify_checkpoint(path)
    state = read_trainer_state(path)
    accelerator.load_state(str(path))
    return state


# ------------------------------------------------------------------------- old-format upgrade
def upgrade_legacy(folder: str | os.PathLike) -> Path:
    """Convert ``trainer_state.pt`` to JSON + safetensors, loading it with ``weights_only=True``.

    A pickle that needs anything but tensors and plain values is refused (nothing of it runs).
    The old file is kept as ``trainer_state.pt.bak``.
    """
    folder = Path(folder)
    f = folder / LEGACY_TRAINER_STATE
    if not f.is_file():
        raise CheckpointError(f"{folder}: no {LEGACY_TRAINER_STATE} to upgrade")
    try:
        state = safe_torch_load(f)
    except Exception as e:
        raise CheckpointError(f"{f}: refused: it holds objects other than tensors and plain values "
                              f"({type(e).__name__}); unpickling it could run code") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: not a trainer state (a dict was expected)")
    write_trainer_state(state, folder)
    os.replace(f, folder / (LEGACY_TRAINER_STATE + ".bak"))
    return folder / TRAINER_STATE


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid_accel.checkpoint",
                                description="Checkpoint maintenance.")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upgrade", help="convert an old trainer_state.pt (pickle) to trainer_state.json")
    up.add_argument("folders", nargs="+", help="checkpoint folders (or run folders: all their checkpoints)")
    a = p.parse_args(argv)
    rc = 0
    for d in map(Path, a.folders):
        targets = [d] if (d / LEGACY_TRAINER_STATE).is_file() else [
            c for c in sorted((d / CKPT_DIR).glob("*")) if (c / LEGACY_TRAINER_STATE).is_file()]
        if not targets:
            print(f"error: {d}: no {LEGACY_TRAINER_STATE} here or under {d / CKPT_DIR}", file=sys.stderr)
            rc = 2
        for c in targets:
            try:
                print(f"wrote {upgrade_legacy(c)}")
            except CheckpointError as e:
                print(f"error: {e}", file=sys.stderr)
                rc = 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
