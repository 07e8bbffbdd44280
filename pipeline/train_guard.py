"""What stands between a training run and a user mistake or a failing machine.

``preflight`` checks, before a run folder is touched, what can be known without training: every
LoRA target names layers of this transformer (on a weightless "meta" copy of the model: no memory,
a fraction of a second), a step of these settings fits in the device's free memory by the memory
model (pipeline.memory), and the training window holds at least one latent patch. (That the
transformer's files are whole, ``paths.require`` checked when it found the folder.) ``explain_failures`` turns running out of
memory or disk during a run into one line that says what to lower or free and which checkpoint is
intact.

    preflight(config, transformer_dir, device)
    with explain_failures(config, run_dir, "training"):
        train(...)
"""
from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from pipeline.errors import CheckpointError, ConfigError, DiskFullError, MemoryLimitError
from pipeline.fileio import free_bytes, is_disk_full
from pipeline.train_config import TrainConfig


# ------------------------------------------------------------------ before the run folder is touched
def preflight(config: TrainConfig, transformer_dir: str | Path, device: torch.device) -> None:
    """Raise the one-line error a start would otherwise meet later (after moving the previous run
    aside, or after minutes of loading). ``transformer_dir``: as ``paths.require("ace_step_transformer")``
    returns it, its weight files already checked."""
    model_config = transformer_config(Path(transformer_dir))
    check_window(config, model_config)
    model = meta_transformer(model_config)
    layers = lora_target_layers(model, config.target_modules)
    check_lora_targets(config, layers)
    check_memory(config, model_config, device)


def transformer_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'} cannot be read ({exc}); re-download "
                              "ACE-Step/ACE-Step-v1-3.5B.") from None


def check_window(config: TrainConfig, model_config: dict) -> None:
    """max_seconds must hold at least one latent patch (else the patch convolution fails)."""
    from cache.collate import max_frames
    from cache.schema import LATENT_RATE

    width = int((model_config.get("patch_size") or [16, 1])[-1])
    if max_frames(config.max_seconds) < width:
        shortest = width / LATENT_RATE
        raise ConfigError(f"train setting 'max_seconds' {config.max_seconds:g} is shorter than one latent patch "
                          f"({width} frame(s) = {shortest:.3f} s); use at least {shortest + 0.005:.2f} "
                          "(official 240).")


def meta_transformer(model_config: dict) -> torch.nn.Module:
    """The transformer built on the meta device as training holds it: its module tree and shapes
    without the modules training never loads (pipeline.train.UNUSED_IN_TRAINING), without any weight."""
    from pipeline.models.transformer import ACEStepTransformer2DModel
    from pipeline.train import drop_unused_in_training

    with torch.device("meta"):
        return drop_unused_in_training(ACEStepTransformer2DModel.from_config(model_config))


def lora_target_layers(model: torch.nn.Module, targets: list[str]) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    """{target: [(module name, module), ...]} as peft matches them (the name, or a name ending in
    ".target")."""
    modules = list(model.named_modules())
    return {t: [(name, m) for name, m in modules if name == t or name.endswith("." + t)] for t in targets}


def _adaptable(module: torch.nn.Module) -> bool:
    """A layer whose LoRA trains, saves and loads here (pipeline.lora): Linear, ungrouped Conv1d."""
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv1d) and module.groups == 1)


def check_lora_targets(config: TrainConfig, layers: dict[str, list[tuple[str, torch.nn.Module]]]) -> None:
    """Every target names at least one layer peft can adapt. A rank above min(in, out) of a layer
    is allowed (the tiny demo model trains the real presets' ranks) but trains nothing more than
    min(in, out) would, at the cost of memory: a warning says so."""
    from pipeline.train import UNUSED_IN_TRAINING

    for target, found in layers.items():
        if not found and target.rsplit(".", 1)[-1] in UNUSED_IN_TRAINING:
            # peft would skip it without a word beside other targets, or fail at load when alone
            raise ConfigError(f"train setting 'target_modules': '{target}' names a cross-attention projection "
                              f"the training step never uses ({', '.join(UNUSED_IN_TRAINING)}: not even loaded "
                              "for training); drop it and adapt to_q, to_k, to_v, to_out.0 instead.")
        if not found:
            raise ConfigError(f"train setting 'target_modules': '{target}' names no layer of the transformer; "
                              "use layer names such as to_q, to_k, to_v, to_out.0, linear_q, speaker_embedder.")
        for name, m in found:
            if _adaptable(m):
                continue
            if isinstance(m, (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)):
                # peft would wrap them, but an Embedding's LoRA is not trained or saved here, a grouped
                # conv's rank must divide its groups, and Conv2d/grouped LoRA files load nowhere else
                kind = "grouped (depthwise) Conv1d" if isinstance(m, torch.nn.Conv1d) else type(m).__name__
                raise ConfigError(f"train setting 'target_modules': '{target}' names {name}, a {kind} layer; "
                                  "LoRA here adapts Linear layers and ungrouped Conv1d layers only: drop it.")
            raise ConfigError(f"train setting 'target_modules': '{target}' names {name}, a "
                              f"{type(m).__name__} block, not a layer; name its layers (e.g. to_q, to_k, to_v).")
    linears = [(n, m) for found in layers.values() for n, m in found if isinstance(m, torch.nn.Linear)]
    narrow = [(n, m) for n, m in linears if config.rank > min(m.in_features, m.out_features)]
    if narrow:
        name, m = min(narrow, key=lambda nm: min(nm[1].in_features, nm[1].out_features))
        warnings.warn(f"rank {config.rank} is more than {len(narrow)} of the {len(linears)} target layers can use "
                      f"(e.g. {name}: {m.in_features}→{m.out_features}, at most {min(m.in_features, m.out_features)}): "
                      "the extra rank trains nothing and costs memory.", stacklevel=2)


def check_memory(config: TrainConfig, model_config: dict, device: torch.device, free: int | None = None) -> None:
    """Refuse settings whose training step cannot fit, before anything is allocated: the memory
    model's estimate (pipeline.memory.estimate_training_memory, which the bench also checks up
    front) of the weights as training loads them, the LoRA with its gradients and AdamW moments, the
    batch and the activations at this rank, max_seconds, batch_size, precision and checkpointing,
    against the memory free on the device now (on a GPU the CUDA context is already taken from it).
    ``free`` for tests."""
    from pipeline.memory import GiB, estimate_training_memory, out_of_memory_advice

    free = _free_memory(device) if free is None else free
    if free is None:
        return

    def estimate(rank: int):
        return estimate_training_memory(model_config, config.max_seconds, rank=rank, precision=config.precision,
                                        gradient_checkpointing=config.gradient_checkpointing,
                                        batch=config.batch_size, targets=config.target_modules)

    needed = estimate(config.rank)
    if needed.total <= free:
        return
    low, high = 0, config.rank - 1  # the largest rank that fits with the other settings as they are (0: none)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if estimate(mid).total <= free else (low, mid - 1)
    if needed.weights >= free:
        advice = "the transformer alone does not fit: " + (
            "use a larger device" if config.precision == "bf16-true" else "use precision bf16-true or a larger device")
    else:
        advice = out_of_memory_advice(needed, fitting_rank=low or None)
    raise MemoryLimitError(
        f"train settings 'rank' {config.rank}, 'max_seconds' {config.max_seconds:g} and 'batch_size' "
        f"{config.batch_size} need about {needed.summary()} for a step, but {device} has {free / GiB:.2f} GiB "
        f"free; {advice}.")


def _free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get: free GPU memory, or the kernel's MemAvailable (free
    pages plus the page cache it can drop; "free" alone would refuse runs on a busy file server)."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (ValueError, OSError, RuntimeError, IndexError):
        pass
    return None


# ------------------------------------------------------------------ during the run
def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (GPU), or the CPU allocator's RuntimeError "can't allocate memory"."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


@contextmanager
def explain_failures(config: TrainConfig, run_dir: str | Path, during: str) -> Iterator[None]:
    """Out of memory or disk while ``during`` (e.g. "training") → one line naming the settings to
    lower or the space to free, and the last good checkpoint (intact: only complete checkpoints are
    ever published)."""
    try:
        yield
    except DiskFullError as exc:
        raise DiskFullError(f"{exc}; {_kept(run_dir)}") from None
    except Exception as exc:
        if is_out_of_memory(exc):
            raise MemoryLimitError(_memory_message(exc, config, during, run_dir)) from None
        if is_disk_full(exc):
            free = free_bytes(run_dir)
            raise DiskFullError(f"disk full while {during} in {run_dir} "
                                f"({'free space unknown' if free is None else f'{free / 1e6:.1f} MB free'}): "
                                f"free some space and run the command again; {_kept(run_dir)}") from None
        raise


def _kept(run_dir: str | Path) -> str:
    from pipeline.train_state import latest_checkpoint

    last = latest_checkpoint(run_dir)
    if last is None:
        return "no checkpoint of this run was saved yet"
    return f"the last good checkpoint {last.name} is intact (continue with --resume latest)"


def _memory_message(exc: BaseException, config: TrainConfig, during: str, run_dir: str | Path) -> str:
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", str(exc))
    size = f" (tried to allocate {asked.group(1)})" if asked else ""
    lower = [f"rank (now {config.rank})"]
    if during == "training":
        lower = [f"max_seconds (now {config.max_seconds:g})", f"batch_size (now {config.batch_size})"] + lower
    also = []
    if during == "training" and config.gradient_checkpointing != "all":  # auto/none/k: "all" recomputes most
        setting = config.gradient_checkpointing
        also.append(f"set gradient_checkpointing all{'' if setting == 'auto' else ' or auto'} (now {setting})")
    if config.precision != "bf16-true":
        also.append("use precision bf16-true")
    fix = "lower " + ", ".join(lower[:-1]) + (" or " if len(lower) > 1 else "") + lower[-1]
    fix += "".join(f", or {a}" for a in also)
    where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "CPU"  # the CPU allocator raises RuntimeError
    return f"out of {where} memory while {during}{size}: {fix}; {_kept(run_dir)}."


__all__ = ["preflight", "transformer_config", "check_window", "meta_transformer", "lora_target_layers", "check_lora_targets", "check_memory",
           "is_out_of_memory", "explain_failures"]
