"""The LoRA training loop: batches in, LoRA checkpoints + metrics out.

It reproduces the official trainer's step (spec §6; docs/training.md lists where we differ) and
holds only the transformer with its LoRA: the batches already carry the latents, text states, lyric
ids and SSL targets (from the feature cache, or from the live source), so neither the codec nor the
text or SSL encoders are imported here. Previews are a callback the caller passes in.

    transformer = load_transformer_for_training(paths.transformer, config)
    summary = train(config, transformer, make_loader(cache, settings), run_dir)
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from cache.collate import bucket_batch
from pipeline import checkpointing, distributed
from pipeline.errors import AceTurboError, CacheError, CheckpointError, ConfigError
from pipeline.fileio import exception_chain, write_text_atomic
from pipeline.metrics import MetricsLogger, read_metrics, truncate_metrics
from pipeline.objective import cfg_dropout, denoise_loss, noisy_latents, sample_sigmas, total_loss, training_sigmas
from pipeline.train_config import TrainConfig
from pipeline.train_state import (
    BEST_FILE,
    LoopState,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    parse_checkpoint_name,
    prune_checkpoints,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    write_best,
)
from pipeline.validation import BestTracker, ValidationSet

ADAPTER = "default"
PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "fp32": torch.float32}
Preview = Callable[[torch.nn.Module, dict, int], Any]


EARLY_STOP = "early stop"  # summary["stopped"] when early_stop_patience ended the run
FINISHED = ("completed", EARLY_STOP)  # summary["stopped"] values of a run that ended as planned


class TrainingDiverged(AceTurboError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------ setup
def lora_settings(config: TrainConfig):
    from pipeline.lora import LoraSettings

    return LoraSettings(r=config.rank, alpha=float(config.alpha), use_rslora=config.rslora,
                        target_modules=tuple(config.target_modules), dropout=config.lora_dropout)


# The cross-attention projections the released checkpoint carries but no forward pass calls
# (pipeline/models/attention.py: CrossAttention). 629 M of the 3.3 B parameters, 1.26 GB in bf16.
UNUSED_IN_TRAINING = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def drop_unused_in_training(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the UNUSED_IN_TRAINING modules: the module tree training holds (and adapts with LoRA)."""
    for block in model.transformer_blocks:
        for name in UNUSED_IN_TRAINING:
            delattr(block.cross_attn, name)
    return model


def load_transformer_for_training(transformer_dir: str | Path, config: TrainConfig,
                                  device: torch.device | str | None = None,
                                  skip_unused: bool = True) -> torch.nn.Module:
    """The transformer, frozen, in the training precision, with a fresh LoRA: all the trainer holds.

    bf16-true: base weights and LoRA in bf16 (peft would otherwise keep LoRA in fp32, STACK.md
    pitfall 5). The LoRA init is seeded by config.seed so that runs are reproducible.
    ``skip_unused`` (the default): the weights training never uses (UNUSED_IN_TRAINING) are not
    read at all; loss and gradients are identical (tests/test_memory.py). False loads every weight
    through diffusers' from_pretrained, as generation does. ``device="meta"``: the module tree with
    no weight read (pipeline.memory_meter counts a step's memory on it).
    """
    from pipeline.lora import apply_lora
    from pipeline.models.transformer import ACEStepTransformer2DModel

    folder = Path(transformer_dir)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"transformer checkpoint not found at '{folder}' (no config.json); download "
                              "ACE-Step/ACE-Step-v1-3.5B and set params.yaml → models → acestep.")
    device = distributed.resolve_device(config.device) if device is None else torch.device(device)
    dtype = PRECISION_DTYPES[config.precision]
    if skip_unused or device.type == "meta":
        model = _load_used_weights(folder, dtype, device)
    else:
        model = ACEStepTransformer2DModel.from_pretrained(folder, torch_dtype=dtype)
        model.to(device=device)  # already in `dtype` (a .to(dtype) here would make diffusers warn)
    model.requires_grad_(False)
    torch.manual_seed(config.seed)
    apply_lora(model, lora_settings(config), adapter_name=ADAPTER, dtype=dtype)
    configure_step(model, config, device)
    model.train()  # official: Lightning trains the transformer in train mode (lyric-encoder dropout on)
    return model


def configure_step(model, config: TrainConfig, device: torch.device) -> None:
    """The speed/memory settings of the training step: which blocks recompute in backward (auto: the
    fewest that fit the device's free memory at the longest batch the run can see), compiled blocks."""
    from cache.collate import max_frames

    blocks = checkpointing.resolve(model, config.gradient_checkpointing, torch.device(device),
                                   tokens=max_frames(config.max_seconds), batch=config.batch_size)
    checkpointing.apply(model, config.gradient_checkpointing, blocks)
    if config.compile:
        compile_blocks(model)


# One compile per shape bucket (cache.collate.bucket_batch): a run over songs of all lengths sees a
# few dozen at most. Past the limit a fullgraph=True compile does not fall back to eager: Dynamo
# raises FailOnRecompileLimitHit, which the loop turns into one line (_recompile_limit_error).
# torch's default limit (8) would stop a run over many song and lyric lengths.
RECOMPILE_LIMIT = 64


def compile_blocks(model, backend: str | Callable = "inductor") -> None:
    """torch.compile the DiT block (diffusers' regional compilation: one graph, reused by every block,
    compiled per shape). The step feeds it shape-bucketed batches (compute_loss)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    model.compile_repeated_blocks(backend=backend, fullgraph=True, dynamic=False)
    # The first block's input comes from frozen layers; every other block's needs a gradient. The
    # compiled graph depends on that, so without this the first block would compile a second graph
    # per shape. The extra input gradient costs ~0.3 % of a step's matmul work.
    model.proj_in.register_forward_hook(_input_needs_grad)


def _input_needs_grad(module, args, output: torch.Tensor):
    return output.detach().requires_grad_() if torch.is_grad_enabled() and not output.requires_grad else None


def _eager():
    """Run compiled blocks eagerly within: validation and previews see shapes (unbucketed, eval mode,
    no grad) that the training step never does; compiled, each would cost a compile and count
    towards the recompile limit. Nothing to do while Dynamo was never imported (nothing compiled):
    importing it only for this would cost an uncompiled run about a second."""
    if "torch._dynamo" not in sys.modules:
        return nullcontext()
    return torch.compiler.set_stance("force_eager")


def _recompile_limit_error(exc: BaseException, step: int, last_good: Path | None) -> ConfigError | None:
    """The one-line error for Dynamo's FailOnRecompileLimitHit anywhere in ``exc``'s chain (the
    compiled block met more shapes than torch's recompile limit allows), else None. Only for a
    compiled model (compile_blocks has imported Dynamo)."""
    import torch._dynamo
    from torch._dynamo.exc import FailOnRecompileLimitHit

    if not any(isinstance(e, FailOnRecompileLimitHit) for e in exception_chain(exc)):
        return None
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
    return ConfigError(
        f"compile: the compiled DiT block reached torch's recompile limit "
        f"({torch._dynamo.config.recompile_limit} shapes) at step {step + 1}: the songs and lyrics fall into "
        f"more shape buckets than that; set compile: false (params.yaml train: or --no-compile) and continue "
        f"with --resume latest; {where}.")


def _load_used_weights(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Build the model on ``meta``, drop the UNUSED_IN_TRAINING modules, then read only the remaining
    tensors, one at a time, into this process's own memory on ``device``.

    Read with pread, not through a memory map: parameters that alias a mapped file count in RSS only
    while the kernel keeps their pages, so a process's peak RSS then depended on the machine's load
    (docs/benchmarks.md, "Memory"), and on a GPU the whole file's pages were touched on the host.
    """
    from safetensors import safe_open

    from pipeline.models.transformer import WEIGHTS_NAME, ACEStepTransformer2DModel

    with torch.device("meta"):
        model = ACEStepTransformer2DModel.from_config(ACEStepTransformer2DModel.load_config(folder))
    drop_unused_in_training(model)
    wanted = model.state_dict()
    if device.type == "meta":
        state = {key: torch.empty_like(t, dtype=dtype if t.is_floating_point() else t.dtype) for key, t in wanted.items()}
    else:
        index = folder / (WEIGHTS_NAME + ".index.json")
        files = json.loads(index.read_text())["weight_map"] if index.is_file() else dict.fromkeys(wanted, WEIGHTS_NAME)
        missing = [key for key in wanted if key not in files]
        by_file: dict[str, list[str]] = {}
        for key in wanted:
            if key in files:
                by_file.setdefault(files[key], []).append(key)
        state = {}
        for name, keys in by_file.items():
            if not (folder / name).is_file():
                raise CheckpointError(f"transformer weights '{folder / name}' are missing; re-download "
                                      "ACE-Step/ACE-Step-v1-3.5B (ace_step_transformer/).")
            with safe_open(str(folder / name), framework="pt", backend="pread") as f:
                present = set(f.keys())
                missing += [key for key in keys if key not in present]
                for key in keys:
                    if key in present:
                        t = f.get_tensor(key)
                        state[key] = t.to(device, dtype if t.is_floating_point() else t.dtype)
        if missing:
            raise CheckpointError(f"transformer weights in '{folder}' lack {len(missing)} tensor(s), e.g. "
                                  f"{missing[0]}; re-download ACE-Step/ACE-Step-v1-3.5B (ace_step_transformer/).")
    model.load_state_dict(state, assign=True, strict=True)
    return model


def lr_factor(step: int, warmup: int, max_steps: int) -> float:
    """Official schedule (spec §6.2): linear 0→1 over `warmup` steps, then linear to 0 at max_steps."""
    if step < warmup:
        return step / warmup
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup))


# ------------------------------------------------------------------ one step
def compute_loss(model, batch: dict, generator: torch.Generator, sigmas: torch.Tensor, config: TrainConfig,
                 device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Official run_step (spec §6.3) on one batch: CFG dropout, sigma, x_t, forward, losses.

    All randomness comes from `generator` on the CPU, before the batch moves to the device, so the
    same seed gives the same noise on any device. With `compile`, the batch is first cut to its
    shape bucket (a random window, from `generator` too). Nothing here waits for the device: the
    parts come back as device scalars (train_step reads them once per optimizer step).
    """
    if config.compile:
        batch = bucket_batch(batch, generator, config.max_seconds)
    batch = cfg_dropout(batch, generator, text_p=config.text_dropout, speaker_p=config.speaker_dropout,
                        lyric_p=config.lyric_dropout)
    noise = torch.randn(batch["latents"].shape, generator=generator, dtype=torch.float32)
    sigma = sample_sigmas(batch["latents"].shape[0], generator, sigmas,
                          logit_mean=config.logit_mean, logit_std=config.logit_std)
    return forward_loss(model, batch, noise, sigma, config, device, dtype, compiled=config.compile)


def forward_loss(model, batch: dict, noise: torch.Tensor, sigma: torch.Tensor, config: TrainConfig,
                 device: torch.device, dtype: torch.dtype, compiled: bool = False
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one batch at the given noise ε and σ [B]: x_t, forward, losses (no randomness;
    compute_loss and the validation loss share it). ``noise`` and ``sigma`` may be on the CPU.
    ``compiled``: the forward runs the compiled blocks (a training step of a compile run), not
    eagerly (validation and previews run eagerly even then)."""
    noise, sigma = _to_device_together(noise, sigma, device=device)  # fp32; σ and 1000σ stay fp32
    # Nothing padded (read on the CPU: no sync): the model skips that mask. Latent frames never are
    # (the loaders crop a batch to equal lengths); prompt and lyrics at batch 1 mostly not, and then
    # the cross-attention runs unmasked (flash kernels). Compiled, a mask is always passed: a graph
    # with and one without would double the compiles, and the buckets pad the lyrics anyway; run
    # eagerly (validation), nothing is compiled and the rule is the uncompiled one.
    frames_unpadded = _all_ones(batch["latent_mask"])
    tokens_unpadded = not compiled and _all_ones(batch["text_mask"]) and _all_ones(batch["lyric_mask"])
    b = batch_to_device(batch, device, dtype)
    x0 = b["latents"]
    x_t = noisy_latents(x0, noise.to(dtype), sigma)
    # SSL targets only when every sample has both (a cache made without them gives Nones)
    mert, mhubert = b.get("mert") or [], b.get("mhubert") or []
    ssl = [mert, mhubert] if mert and mhubert and all(x is not None for x in mert + mhubert) else None
    out = model(
        hidden_states=x_t, attention_mask=None if frames_unpadded else b["latent_mask"],
        encoder_text_hidden_states=b["text_states"], text_attention_mask=None if tokens_unpadded else b["text_mask"],
        speaker_embeds=b["speaker"], lyric_token_idx=b["lyric_ids"],
        lyric_mask=None if tokens_unpadded else b["lyric_mask"],
        timestep=1000.0 * sigma,  # fp32: a bf16 timestep would round 1000σ to steps of 4
        ssl_hidden_states=ssl,
    )
    denoise = denoise_loss(out.sample, x_t, x0, sigma, b["latent_mask"])
    return total_loss(denoise, out.proj_losses or [], ssl_coeff=config.ssl_coeff)


def _all_ones(mask: torch.Tensor) -> bool:
    """True when a CPU mask has no zero (a device mask is not read: that would wait for the device)."""
    return mask.device.type == "cpu" and bool(mask.all())


LOSS_KEYS = ("loss", "denoise_loss", "mert_loss", "mhubert_loss")


def train_step(model, source: "_BatchStream", optimizer, scheduler, params: list[torch.nn.Parameter],
               generator: torch.Generator, sigmas: torch.Tensor, config: TrainConfig,
               device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """One optimizer step over `grad_accumulation` batches; returns its metrics (losses averaged over
    the micro-batches and, under DDP, over the ranks).

    The host waits for the device once per step: every logged number (losses, gradient norm, the
    LoRA signals) is fetched in one copy after the update, and the NaN/inf check reads that copy (a
    diverged step is never saved). All micro-batches are
    taken from the source before any random draw, so an interrupt raised by the source leaves the
    random state as it was at the step's start.
    """
    accum = config.grad_accumulation
    batches = [source.next() for _ in range(accum)]
    parts_sum = None
    for micro, batch in enumerate(batches):
        # DDP: all-reduce gradients only on the last micro-batch of the step
        sync = micro == accum - 1 or not hasattr(model, "no_sync")
        with nullcontext() if sync else model.no_sync():
            loss, parts = compute_loss(model, batch, generator, sigmas, config, device, dtype)
            (loss / accum).backward()
        parts = torch.stack([parts[key] for key in LOSS_KEYS]) / accum
        parts_sum = parts if parts_sum is None else parts_sum + parts
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # same on every rank: gradients are all-reduced
    lr = scheduler.get_last_lr()[0]  # the rate this step uses (the official train/learning_rate)
    before = [p.detach().clone() for p in params]  # one transient copy of the LoRA weights
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    signals = lora_signals(params, before)
    # The one host sync of the step: every logged number in one copy, after the update. A NaN/inf
    # loss or gradient has then already reached the weights, but a diverged run is never saved (the
    # last checkpoint on disk stays the good one). NaN/inf on any rank makes the mean over ranks
    # NaN/inf too, so every rank stops at the same step.
    keys = LOSS_KEYS + ("grad_norm", "lora_norm", "update_ratio")
    values = torch.cat([parts_sum.float(), grad_norm.float().reshape(1),
                        torch.stack([signals["lora_norm"], signals["update_ratio"]]).float()])
    record = dict(zip(keys, distributed.mean_across_ranks(values).tolist()))
    for key in ("loss", "grad_norm"):
        if not math.isfinite(record[key]):
            raise TrainingDiverged(f"{'loss' if key == 'loss' else 'gradient norm'} is {record[key]} (NaN/inf)")
    return {**record, "lr": lr}


def lora_signals(params: list[torch.nn.Parameter], before: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA weight norm ‖θ‖ after the step and the update/weight ratio ‖Δθ‖ / ‖θ before‖, as 0-dim
    tensors on the device (no host sync; they are fetched with the step's other scalars). A ratio
    that stays near 0 from the start means the LoRA does not move (e.g. the bf16-mixed symptom).
    ``before`` (the weights before the step) is overwritten."""
    with torch.no_grad():
        norm_before = torch.nn.utils.get_total_norm(before)
        norm = torch.nn.utils.get_total_norm(params)
        torch._foreach_sub_(before, [p.detach() for p in params])  # one fused kernel per dtype/device
        update = torch.nn.utils.get_total_norm(before)
    return {"lora_norm": norm, "update_ratio": update / norm_before.clamp_min(1e-12)}


# ------------------------------------------------------------------ validation
def validation_loss(model, validation: ValidationSet, config: TrainConfig, device: torch.device,
                    dtype: torch.dtype) -> dict[str, float]:
    """The loss on the fixed validation set (pipeline/validation.py): eval mode, no CFG dropout, no
    gradients, one forward pass per song with its σ grid as the batch. The global RNGs and the
    train/eval mode are restored after; the training generator is never touched."""
    was_training = model.training
    totals = {"loss": 0.0, "denoise_loss": 0.0}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), _eager():
        model.eval()
        try:
            for item in validation.items:
                # The song repeated over its σ grid on the CPU, moved by forward_loss as a training
                # batch is: it reads the masks on the CPU to skip the unpadded ones (flash kernels).
                # Tensors are small (latents, prompt, lyrics); the SSL lists repeat one tensor, moved once.
                n = item.sigmas.shape[0]
                batch = {k: v.expand(n, *v.shape[1:]).contiguous() if isinstance(v, torch.Tensor)
                         else v * n if isinstance(v, list) else v for k, v in item.batch.items()}
                _, parts = forward_loss(model, batch, item.noise(), item.sigmas, config, device, dtype)
                for key in totals:
                    totals[key] += float(parts[key]) / len(validation.items)
        finally:
            model.train(was_training)
    return {"val_loss": totals["loss"], "val_denoise_loss": totals["denoise_loss"]}


class _Validation:
    """The loop's validation hook: when to validate, the best checkpoint, early stop.

    Runs on rank 0 (like previews, on the unwrapped transformer); every decision that changes what
    all ranks do (save a new best, stop) goes through distributed.any_rank."""

    def __init__(self, data: ValidationSet | None, transformer, config: TrainConfig, run_dir: Path, rank,
                 device: torch.device, dtype: torch.dtype):
        self.data = data if rank.is_main else None
        self.transformer, self.config, self.run_dir = transformer, config, run_dir
        self.device, self.dtype = device, dtype
        self.enabled = distributed.any_rank(self.data is not None, device)
        self.tracker = BestTracker(patience=config.early_stop_patience)
        self.best_path: Path | None = None
        self.last: dict[str, float] = {}
        self.seconds: list[float] = []

    def resume(self) -> None:
        """Continue the best/patience count of the records up to the checkpoint (rank 0)."""
        if self.data is None:
            return
        self.tracker = BestTracker.from_records(read_metrics(self.run_dir / "metrics.jsonl"),
                                                self.config.early_stop_patience)
        self.best_path = next((p for p in list_checkpoints(self.run_dir)
                               if parse_checkpoint_name(p.name)[1] == self.tracker.best_step), None)
        if self.best_path is not None:
            self._write_best()
        else:  # names a step after the checkpoint (redone now), or nothing yet
            (self.run_dir / BEST_FILE).unlink(missing_ok=True)

    def due(self, step: int) -> bool:
        every = self.config.validation_interval
        return self.enabled and (step == self.config.max_steps or bool(every and step % every == 0))

    def run(self, step: int, bar) -> tuple[dict[str, Any], bool]:
        """Validate after ``step``: (fields for this step's metrics record, whether to save this step
        because it is a new best)."""
        fields, improved = {}, False
        if self.data is not None:
            tic = time.perf_counter()
            self.last = validation_loss(self.transformer, self.data, self.config, self.device, self.dtype)
            self.seconds.append(time.perf_counter() - tic)
            improved = self.tracker.update(step, self.last["val_loss"])
            fields = {**{k: v if math.isfinite(v) else None for k, v in self.last.items()},
                      "val_seconds": round(self.seconds[-1], 4), "best_step": self.tracker.best_step,
                      "best_val_loss": self.tracker.best_loss if self.tracker.best_step is not None else None}
            best = "new best" if improved else f"best {self.tracker.best_loss:.5f} at step {self.tracker.best_step}"
            bar.write(f"step {step}: val_loss {self.last['val_loss']:.5f} ({best}; {self.seconds[-1]:.2f} s)")
        return fields, distributed.any_rank(improved, self.device)

    @property
    def should_stop(self) -> bool:
        return self.tracker.should_stop

    def stop_message(self) -> str:
        return (f"early stop: no new best validation loss in {self.config.early_stop_patience} validations "
                f"(best {self.tracker.best_loss:.5f} at step {self.tracker.best_step})")

    def saved(self, checkpoint: Path, step: int) -> list[Path]:
        """After a checkpoint is written (rank 0): record it as best if it is; the checkpoints to keep."""
        if self.data is not None and step == self.tracker.best_step:
            self.best_path = checkpoint
            self._write_best()
        return [self.best_path] if self.best_path is not None else []

    def _write_best(self) -> None:
        write_best(self.run_dir, self.best_path, val_loss=self.tracker.best_loss, held_out=self.data.held_out)

    def summary(self) -> dict[str, Any]:
        return {"val_loss": self.last.get("val_loss"),
                "best_step": self.tracker.best_step,
                "best_val_loss": self.tracker.best_loss if self.tracker.best_step is not None else None,
                "best_checkpoint": str(self.best_path) if self.best_path else None,
                "val_seconds": sum(self.seconds) / len(self.seconds) if self.seconds else None,
                "val_held_out": self.data.held_out if self.data is not None else None}


# ------------------------------------------------------------------ the loop
def train(config: TrainConfig, transformer: torch.nn.Module, batches: Iterable[dict], run_dir: str | Path,
          preview: Preview | None = None, resume: str | Path | None = None,
          validation: ValidationSet | None = None) -> dict[str, Any]:
    """Train the transformer's LoRA on `batches` until config.max_steps; return a summary dict.

    `batches`: an iterable of batches (the cache loader or the live source); if it has
    state_dict()/load_state_dict() its position is checkpointed. It is iterated again at its end
    (a new epoch). `resume`: "latest", a checkpoint folder, or None for a new run.
    `validation`: the fixed validation set (pipeline.validation.build_validation_set; needed on
    rank 0 only), evaluated every config.validation_interval steps and at the end; the best
    checkpoint is kept and named in best.json; early_stop_patience stops on a plateau.
    Stops cleanly on SIGTERM or Ctrl-C (checkpoint saved, summary["stopped"] says why).
    """
    config.validate()
    run_dir = Path(run_dir)
    rank = distributed.info()
    for note in config.advice():
        if rank.is_main and (preview is not None or "plot_every" not in note):
            warnings.warn(note, stacklevel=2)
    device = next(transformer.parameters()).device
    dtype = PRECISION_DTYPES[config.precision]
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the transformer has no trainable LoRA parameters: load it with "
                          "load_transformer_for_training (or apply_lora) before train().")
    settings = lora_settings(config)
    model = distributed.wrap(transformer)
    # fused: one multi-tensor kernel for the whole update on CUDA
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=tuple(config.betas),
                                  weight_decay=config.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=config.warmup_steps, max_steps=config.max_steps))
    sigmas = training_sigmas(shift=config.shift)
    generator = torch.Generator().manual_seed(config.seed + rank.rank)  # one stream per rank
    _seed_global(config.seed + rank.rank)

    loop = LoopState()
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"experiment folder {run_dir} already holds checkpoints; continue it with --resume latest, or "
            "pick another experiment name (or delete the folder) to start over."
        )
    if resume:
        path = resolve_resume(run_dir, resume)
        loop = load_checkpoint(path, transformer, optimizer, scheduler, settings, adapter_name=ADAPTER)
        _restore_position(loop, generator, batches, rank, config.seed)
        _say(rank, f"resumed from {path} at step {loop.step}")
    if rank.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "train_config.json", config.to_json())
        truncate_metrics(run_dir / "metrics.jsonl", loop.step)  # steps after the checkpoint are redone
    logger = MetricsLogger(run_dir, plot_every=config.log_plot_every, enabled=rank.is_main, title=config.run_name)
    validator = _Validation(validation, transformer, config, run_dir, rank, device, dtype)
    if resume:
        validator.resume()
    step_settings = {"gradient_checkpointing": checkpointing.describe(transformer.checkpointed_blocks,
                                                                      len(transformer.transformer_blocks)),
                     "compile": config.compile}
    _say(rank, f"step: gradient checkpointing {step_settings['gradient_checkpointing']} (setting "
               f"{config.gradient_checkpointing}), compile {'on' if config.compile else 'off'}")
    source = _BatchStream(batches, loop.epoch)
    last_good = latest_checkpoint(run_dir) if resume else None
    saved_step = loop.step if resume else -1
    stopped, times = "completed", []
    bar = _progress(rank, loop.step, config.max_steps)

    def save(state: LoopState, collective: bool = True) -> None:
        nonlocal last_good, saved_step
        if collective:  # every rank's RNG and loader position, so a DDP resume is exact too
            state.rng, state.loader = distributed.gather(state.rng), distributed.gather(state.loader)
        else:
            state.rng, state.loader = [state.rng], [state.loader]
        if rank.is_main:
            logger.sync()  # metrics.jsonl on disk up to the step the checkpoint holds
            last_good = save_checkpoint(run_dir, transformer, settings, optimizer, scheduler, state,
                                        config.to_dict(), adapter_name=ADAPTER)
            prune_checkpoints(run_dir, config.keep_last, protect=validator.saved(last_good, state.step))
        saved_step = state.step
        if collective:
            distributed.barrier()

    with _StopRequest() as stop, _closing(logger, bar):
        try:
            model.train()
            while loop.step < config.max_steps:
                start = None
                if distributed.any_rank(stop.reason is not None or validator.should_stop, device):
                    stopped = stop.reason or (EARLY_STOP if validator.should_stop else "stopped by another rank")
                    break
                # what an interrupt mid-step saves; its RNG states are read only if one comes (the
                # step draws nothing before it has all its batches)
                start = LoopState(step=loop.step, epoch=source.epoch, loader=source.state())
                if preview is not None and config.plot_every and loop.step % config.plot_every == 0:
                    _run_preview(preview, transformer, source, loop.step, rank, device)
                tic = time.perf_counter()
                record = train_step(model, source, optimizer, scheduler, params, generator, sigmas, config,
                                    device, dtype)
                start = None  # weights moved on: `start` no longer matches them
                loop.step, loop.epoch = loop.step + 1, source.epoch
                times.append(time.perf_counter() - tic)
                entry = _record(loop, record, times[-1], config, rank, device)
                new_best = False
                if validator.due(loop.step):  # before logging: the step's record carries val_loss
                    fields, new_best = validator.run(loop.step, bar)
                    entry.update(fields)
                logger.log(entry)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                periodic = config.save_every and loop.step % config.save_every == 0
                if (periodic or new_best) and loop.step < config.max_steps:  # a new best is always a checkpoint
                    save(_position(loop, generator, source))
        except KeyboardInterrupt:
            stopped = "interrupted (Ctrl-C)"
            if stop.hard:  # a second Ctrl-C may land inside the optimizer update: save nothing
                _say(rank, f"stopped at once; the last checkpoint is {last_good}.")
            else:  # raised by the batch source or the preview, before this step changed any weight
                loop = dataclasses.replace(start, rng=capture_rng(generator)) if start else \
                    _position(loop, generator, source)
                save(loop, collective=False)
        except TrainingDiverged as exc:
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
            raise TrainingDiverged(
                f"training diverged at step {loop.step + 1}: {exc}; {where}. Lower learning_rate, keep "
                "grad_clip on, or use precision fp32."
            ) from None
        except Exception as exc:
            error = _recompile_limit_error(exc, loop.step, last_good) if config.compile else None
            if error is None:
                raise
            raise error from None
        if not stop.hard and saved_step != loop.step:
            save(_position(loop, generator, source))  # the final checkpoint (also after SIGTERM)
        logger.plot()
    steady = times[1:] or times  # the first step pays for warm-up allocations
    summary = {
        "run_dir": str(run_dir), "step": loop.step, "epoch": loop.epoch, "stopped": stopped,
        "checkpoint": str(last_good) if last_good else None,
        "last_loss": logger.last.get("loss") if rank.is_main else None,
        "sec_per_step": sum(steady) / len(steady) if steady else None,
        "tensorboard": logger.has_tensorboard if rank.is_main else False,
        **validator.summary(),
        "step_settings": step_settings,
    }
    if stopped == EARLY_STOP:
        _say(rank, f"{validator.stop_message()}; stopped at step {loop.step}, checkpoint {last_good}.")
    elif stopped != "completed" and not stop.hard:
        _say(rank, f"{stopped}: stopped at step {loop.step}; checkpoint {last_good}. Continue with --resume latest.")
    return summary


# ------------------------------------------------------------------ helpers
class _closing:
    """Close the metrics file and the progress bar however the loop ends."""

    def __init__(self, *things):
        self.things = things

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for thing in self.things:
            try:
                thing.close()
            except Exception:
                if exc[0] is None:
                    raise  # else the loop's own error (e.g. the same full disk) is the one to report


class _BatchStream:
    """Endless batches from a finite iterable: a new pass (epoch) starts when one ends."""

    def __init__(self, batches: Iterable[dict], epoch: int = 0):
        self.batches, self._epoch, self._it, self._peeked = batches, epoch, None, None

    @property
    def epoch(self) -> int:
        state = self.state()
        return int(state["epoch"]) if isinstance(state, dict) and "epoch" in state else self._epoch

    def state(self) -> dict | None:
        return self.batches.state_dict() if hasattr(self.batches, "state_dict") else None

    def peek(self) -> dict:
        """The batch the next step starts with (the official preview runs on the current batch)."""
        if self._peeked is None:
            self._peeked = self._fetch()
        return self._peeked

    def next(self) -> dict:
        if self._peeked is not None:
            batch, self._peeked = self._peeked, None
            return batch
        return self._fetch()

    def _fetch(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.batches)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self._epoch += 1
        raise CacheError("the batch source produced no batches: is the feature cache empty? "
                         "Run `dvc repro` (or `aceturbo encode`) first.")


class _StopRequest:
    """SIGTERM, or a first Ctrl-C, asks the loop to stop after the current step (then it saves); a
    second Ctrl-C raises KeyboardInterrupt at once. Only the main thread can install handlers."""

    def __init__(self):
        self.reason: str | None = None
        self.hard = False  # the KeyboardInterrupt came from a second Ctrl-C
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_sigterm(self, signum, frame) -> None:
        self.reason = self.reason or "SIGTERM"

    def _on_sigint(self, signum, frame) -> None:
        if self.reason is not None:
            self.hard = True
            raise KeyboardInterrupt
        self.reason = "interrupted (Ctrl-C)"
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to stop at once)...",
              flush=True)


def _position(loop: LoopState, generator: torch.Generator, source: _BatchStream) -> LoopState:
    return LoopState(step=loop.step, epoch=source.epoch, rng=capture_rng(generator), loader=source.state())


def _restore_position(loop: LoopState, generator, batches, rank: distributed.DistInfo, seed: int) -> None:
    """Put RNGs and the batch source back where the checkpoint's rank left them."""
    rngs, loaders = loop.rng, loop.loader
    if len(rngs) == rank.world_size:
        restore_rng(rngs[rank.rank], generator)
    else:  # resumed on another number of processes: continue exact on rank 0, reseed the others
        restore_rng(rngs[0], generator)
        if rank.rank:
            generator.manual_seed(seed + rank.rank + 7919 * loop.step)
    loader = loaders[rank.rank] if len(loaders) == rank.world_size else loaders[0]
    if loader is not None and hasattr(batches, "load_state_dict"):
        batches.load_state_dict(loader)


def _run_preview(preview: Preview, transformer, source: _BatchStream, step: int, rank, device) -> None:
    """Preview on rank 0 on the upcoming batch, without touching the training RNG streams."""
    if not rank.is_main:
        return
    batch = source.peek()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), _eager():
        transformer.eval()
        try:
            preview(transformer, batch, step)
        finally:
            transformer.train()


def _record(loop: LoopState, record: dict, seconds: float, config: TrainConfig, rank, device) -> dict:
    """The metrics.jsonl record of a step (train_step's losses are already the mean over ranks, like
    Lightning's sync_dist)."""
    samples = config.batch_size * config.grad_accumulation * rank.world_size
    return {"step": loop.step, "epoch": loop.epoch, **{k: record[k] for k in LOSS_KEYS}, "lr": record["lr"],
            "grad_norm": record["grad_norm"], "lora_norm": record["lora_norm"], "update_ratio": record["update_ratio"],
            "sec_per_step": round(seconds, 6), "samples_per_s": round(samples / seconds, 4) if seconds > 0 else None}


def loader_settings(config: TrainConfig, device: torch.device, speaker_dim: int, **extra):
    """The cache loader's settings for training with ``config`` on ``device`` (``aceturbo train`` and
    the bench's cached modes): worker processes as ``num_workers`` resolves for the device, pinned
    batches on CUDA (batch_to_device's copies then do not block the host). ``extra``: further
    LoaderSettings fields (e.g. the expected encoder fingerprints)."""
    from cache.loader import LoaderSettings

    return LoaderSettings(batch_size=config.batch_size, max_seconds=config.max_seconds, seed=config.seed,
                          num_workers=config.loader_workers(device.type), pin_memory=device.type == "cuda",
                          speaker_dim=speaker_dim, **extra)


def batch_to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Floats to the training dtype, integers (ids, text/lyric masks) kept, on `device`. To a GPU the
    copies come from pinned memory and do not block the host (the cast happens on the device). A
    tensor listed several times (validation's repeated SSL features) is moved once."""
    moved: dict[int, torch.Tensor] = {}

    def move(x):
        if isinstance(x, torch.Tensor):
            if id(x) not in moved:
                y = _to_device(x, device)
                moved[id(x)] = y.to(dtype) if y.is_floating_point() else y
            return moved[id(x)]
        if isinstance(x, (list, tuple)):
            return [move(v) for v in x]
        return x
    return {key: move(value) for key, value in batch.items()}


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)


def _to_device_together(*tensors: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Same-dtype CPU tensors to `device` in one copy (then split there)."""
    flat = _to_device(torch.cat([t.reshape(-1) for t in tensors]), device)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _seed_global(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _say(rank, message: str) -> None:
    if rank.is_main:
        print(message, flush=True)


def _progress(rank, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not rank.is_main,
                dynamic_ncols=True)
