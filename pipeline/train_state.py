"""LoRA checkpoints: save (atomically), find, load for resume, prune.

A checkpoint is a folder ``<run_dir>/checkpoints/epoch=E-step=S_lora/`` (the official name, spec §6.6):

- ``pytorch_lora_weights.safetensors`` — the LoRA in the official layout with the trained scale baked
  into lora_B (pipeline.lora.save_lora): the file generation, ComfyUI and the official pipeline load,
  right at strength 1.0 in each.
- ``training_state.pt`` — what resuming needs: the unbaked LoRA weights as trained (``lora_weights``),
  optimizer and scheduler state, step, epoch, every RNG state and the batch source's position. Never
  base weights. Format 1 (before baking) had no ``lora_weights``: its LoRA file held them unbaked.

Both are written into a hidden temp folder (``.tmp-*``), flushed to disk and renamed into place, so a
crash, Ctrl-C or power cut never leaves a half-written checkpoint where ``--resume latest`` would
find it. Pruning renames a folder to a hidden ``.trash-*`` name before deleting it, and saving a step
again moves the old copy to ``.old-*`` only for the moment of the rename: a kill at any instant leaves
every official-name folder complete. The hidden leftovers of a killed process are cleared (or, for
an ``.old-*`` copy whose official name is missing, put back) by :func:`clean_leftovers` when the next
training starts, under the run lock (pipeline.locks).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from pipeline.errors import CheckpointError, ConfigError
from pipeline.fileio import disk_full_guard, fsync_dir, fsync_tree, publish_dir, remove_dir_atomic, write_json_atomic
from pipeline.lora import lora_state_dict, save_lora

CHECKPOINTS_DIR = "checkpoints"
LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "training_state.pt"
STATE_FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: no lora_weights, the LoRA file is unbaked
_NAME = re.compile(r"^epoch=(\d+)-step=(\d+)_lora$")
# Hidden names inside checkpoints/: a folder being written, the old copy of a step saved again, a
# folder being deleted. None of them is ever listed as a checkpoint.
_TMP, _OLD, _TRASH = ".tmp-", ".old-", ".trash-"


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch={epoch}-step={step}_lora"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(epoch, step) of a checkpoint folder name, or None."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest step first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        parsed = parse_checkpoint_name(p.name)
        if parsed and (p / LORA_FILE).is_file() and (p / STATE_FILE).is_file():
            found.append((parsed[1], parsed[0], p))
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir: str | Path, resume: str | Path) -> Path:
    """The checkpoint folder meant by ``resume``: "latest", a checkpoint folder, its LoRA file, or
    a run folder (its latest checkpoint). ConfigError naming the fix when there is none."""
    run_dir = Path(run_dir)
    if str(resume) == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise ConfigError(
                f"resume=latest but '{run_dir / CHECKPOINTS_DIR}' holds no complete checkpoint; "
                "drop --resume to start a new run."
            )
        return found
    path = Path(resume)
    if path.is_file() and path.name in (LORA_FILE, STATE_FILE):
        path = path.parent
    if path.is_dir() and parse_checkpoint_name(path.name) is None and (path / CHECKPOINTS_DIR).is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            path = found
    if not path.is_dir():
        raise ConfigError(f"resume checkpoint '{resume}' not found; pass 'latest' or a checkpoint folder "
                          f"(…/{CHECKPOINTS_DIR}/epoch=E-step=S_lora).")
    if not (path / STATE_FILE).is_file() or not (path / LORA_FILE).is_file():
        raise ConfigError(
            f"'{path}' cannot resume training: it needs both {LORA_FILE} and {STATE_FILE} "
            "(an exported LoRA has no optimizer state); pick a folder under the run's checkpoints/."
        )
    return path


# ------------------------------------------------------------------ RNG state
def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a step consumes: our generator (noise, sigma, CFG dropout), torch's global
    RNGs (dropout inside the model), Python's and NumPy's (a batch source may use them)."""
    np_state = np.random.get_state()
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        # stored as plain lists/ints so that the file loads with torch.load(weights_only=True)
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# ------------------------------------------------------------------ the loop's position
@dataclass
class LoopState:
    """Where the loop is: resuming from it repeats exactly what an uninterrupted run would do."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    # capture_rng(...) while running; in a checkpoint a list with one entry per rank
    rng: Any = field(default_factory=dict)
    loader: Any = None  # batches.state_dict() (per rank in a checkpoint), None if it has none


def save_checkpoint(
    run_dir: str | Path,
    transformer: torch.nn.Module,
    lora_settings: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop: LoopState,
    config: dict[str, Any] | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write ``checkpoints/epoch=E-step=S_lora/`` atomically and return its path."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(folder.parent)
    final = folder / checkpoint_name(loop.epoch, loop.step)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f"{_TMP}{final.name}-"))
    state = {
        "format": STATE_FORMAT,
        "step": loop.step,
        "epoch": loop.epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": loop.rng,
        "loader": loop.loader,
        "lora": _lora_signature(lora_settings),
        "config": config or {},
        # Resume needs the exact trained factors; the LoRA file holds scale × B (maybe as float32).
        "lora_weights": {k: t.to("cpu", copy=True) for k, t in lora_state_dict(transformer, adapter_name).items()},
    }
    old = None
    try:
        # a full disk: one line naming the file and the space it needs (torch.save gives no errno)
        with disk_full_guard(final / LORA_FILE, _nbytes(state["lora_weights"])):
            save_lora(transformer, tmp, lora_settings, adapter_name=adapter_name)
        with disk_full_guard(final / STATE_FILE, _nbytes(state)):
            torch.save(state, tmp / STATE_FILE)
        if final.exists():  # same step saved again (e.g. interrupted right after a resume)
            fsync_tree(tmp)  # flushed first: the old copy steps aside only for the two renames
            old = folder / f"{_OLD}{final.name}-{os.getpid()}"
            os.rename(final, old)
        publish_dir(tmp, final)  # fsync of every file and the folder, rename, fsync of checkpoints/
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: about what saving it needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def load_checkpoint(
    path: str | Path,
    transformer: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    lora_settings: Any,
    adapter_name: str = "default",
) -> LoopState:
    """Put a checkpoint's LoRA weights (in place, so the optimizer keeps its parameters), optimizer
    and scheduler state back; return the loop position (the caller restores RNGs and the loader)."""
    path = Path(path)
    state = _read_state(path)
    want = _lora_signature(lora_settings)
    if state["lora"] != want:
        raise ConfigError(
            f"cannot resume from '{path}': it was trained with LoRA {state['lora']} but the settings now ask "
            f"for {want}; use the run's original rank/alpha/targets or start a new experiment."
        )
    weights = _trained_weights(path, state)
    params = lora_state_dict(transformer, adapter_name)  # detached views: copy_ fills the parameters in place
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{path / LORA_FILE} does not match the model's LoRA layers "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same transformer."
        )
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(weights[key].to(device=p.device, dtype=p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return LoopState(step=int(state["step"]), epoch=int(state["epoch"]), rng=state["rng"], loader=state["loader"])


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path / STATE_FILE} ({type(exc).__name__}: {exc}); "
                              "resume from an earlier checkpoint.") from None
    if state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path / STATE_FILE} has format {state.get('format')!r}, expected one of "
                              f"{READABLE_FORMATS}; resume it with the aceturbo version that wrote it.")
    return state


def _trained_weights(path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    if "lora_weights" in state:
        return state["lora_weights"]
    from safetensors.torch import load_file  # format 1: the LoRA file holds the trained weights unbaked

    return load_file(str(path / LORA_FILE))


def checkpoint_lora_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA weights exactly as trained (unbaked, official keys) of a checkpoint folder, any format."""
    path = Path(path)
    return _trained_weights(path, _read_state(path))


def prune_checkpoints(run_dir: str | Path, keep_last: int, protect: Iterable[str | Path] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (0: keep all); checkpoints named in
    ``protect`` (folders or their names) are kept too. Each folder is renamed to a hidden name
    first, so a kill mid-delete never leaves half a checkpoint under an official name."""
    if keep_last <= 0:
        return []
    kept = {Path(p).name for p in protect}
    removed = []
    for p in list_checkpoints(run_dir)[:-keep_last]:
        if p.name not in kept:
            remove_dir_atomic(p, hidden_prefix=_TRASH)
            removed.append(p)
    return removed


def clean_leftovers(run_dir: str | Path) -> list[str]:
    """Clear what a killed training left in its run folder; returns one note per thing done.

    Call it only while holding the run lock (pipeline.locks.run_lock): every hidden temp in the
    folder then belongs to a dead process. An ``.old-*`` copy whose official name is missing (a
    kill between the two renames of a re-save) is put back; ``.tmp-*`` / ``.trash-*`` folders,
    ``.NAME.*.tmp`` files of atomic writes and official-name folders without a LoRA file (left by
    a kill during an older, non-atomic prune) are deleted.
    """
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINTS_DIR
    notes = []
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if not p.is_dir():
                continue
            if p.name.startswith(_OLD):
                name = p.name[len(_OLD):].rsplit("-", 1)[0]  # .old-<name>-<pid>
                if not (folder / name).exists() and (p / LORA_FILE).is_file() and (p / STATE_FILE).is_file():
                    os.rename(p, folder / name)
                    notes.append(f"put back {name} (a re-save of it was interrupted)")
                    continue
            if p.name.startswith((_TMP, _OLD, _TRASH)):
                shutil.rmtree(p, ignore_errors=True)
            elif parse_checkpoint_name(p.name) and not (p / LORA_FILE).is_file():
                remove_dir_atomic(p, hidden_prefix=_TRASH)
            else:
                continue
            notes.append(f"removed {p.name} (left by an interrupted save or prune)")
        fsync_dir(folder)
    if run_dir.is_dir():
        for root, _dirs, files in os.walk(run_dir):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    Path(root, name).unlink(missing_ok=True)
                    notes.append(f"removed {Path(root, name).relative_to(run_dir)} (temp file of an interrupted write)")
    return notes


def _lora_signature(settings: Any) -> dict[str, Any]:
    return {
        "r": int(settings.r),
        "alpha": float(settings.alpha),
        "use_rslora": bool(settings.use_rslora),
        "target_modules": sorted(settings.target_modules),
    }


# ------------------------------------------------------------------ the best checkpoint
# ``<run>/best.json`` names the checkpoint with the lowest validation loss (a record, not a copy of the
# weights: nothing to go stale, no second folder for --resume or the pruning to mistake for a checkpoint).
BEST_FILE = "best.json"


def write_best(run_dir: str | Path, checkpoint: str | Path, **values: Any) -> Path:
    """Record ``checkpoint`` as the run's best (path relative to the run, so the folder can move)."""
    run_dir = Path(run_dir)
    epoch, step = parse_checkpoint_name(Path(checkpoint).name)
    record = {"checkpoint": f"{CHECKPOINTS_DIR}/{Path(checkpoint).name}", "step": step, "epoch": epoch, **values}
    return write_json_atomic(run_dir / BEST_FILE, record, sort_keys=True)


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """best.json with ``path`` (the checkpoint folder) added, or None when there is none (validation
    off, or no validation yet) or it names a checkpoint that is gone."""
    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / BEST_FILE).read_text(encoding="utf-8"))
        path = run_dir / record["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if path not in list_checkpoints(run_dir):
        return None
    return {**record, "path": path}


def find_checkpoints(run_dir: str | Path, which: Iterable[str | int]) -> list[Path]:
    """The checkpoint folders meant by ``which``: step numbers, "best" (best.json) or "latest".
    ConfigError in one line naming every missing one and listing the steps that exist."""
    run_dir = Path(run_dir)
    found = {parse_checkpoint_name(p.name)[1]: p for p in list_checkpoints(run_dir)}
    best = read_best(run_dir)
    out, missing = [], []
    for token in which:
        token = str(token).strip()
        if token == "best" and best is not None:
            out.append(best["path"])
        elif token == "latest" and found:
            out.append(found[max(found)])
        elif token.isdigit() and int(token) in found:
            out.append(found[int(token)])
        else:
            missing.append(token)
    if missing:
        steps = ", ".join(str(s) for s in sorted(found)) or "none"
        have_best = f"; best = step {best['step']}" if best else "; no best (best.json: the validation was off or has not run)"
        raise ConfigError(f"run '{run_dir.name}' has no checkpoint for {', '.join(missing)}; its checkpoints are "
                          f"at steps {steps}{have_best}. Pick from those (e.g. --steps {','.join(map(str, sorted(found)[-2:])) or 'best'}).")
    return out
