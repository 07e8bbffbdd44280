"""Counting a training step's memory: the tensor meter, and the product's step run under it.

``TensorMemoryMeter`` adds up the bytes of every tensor storage alive while it is active and keeps
the peak — what ``torch.cuda.max_memory_allocated`` reports on a GPU, on any device. On ``meta``
tensors (no data, no compute) it counts sizes no machine here could hold, which is how the full-size
step is counted on a CPU. ``count_step_memory`` runs pipeline.train's own ``train_step`` on the model
from ``load_transformer_for_training`` under the meter; ``check_against_meter`` puts the memory
model (pipeline.memory) next to it (tests/test_memory.py, ``aceturbo bench --memory-check``).
gradient_checkpointing=auto uses the same meter on a forward pass alone, read at each block's end
(pipeline.checkpointing.estimate_activations).
"""
from __future__ import annotations

import json
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from pipeline.memory import estimate_training_memory, transformer_dims


class TensorMemoryMeter(TorchDispatchMode):
    """Peak bytes of live tensor storage while it is active: what the CUDA caching allocator's
    ``max_memory_allocated`` counts (without its 512-byte rounding), for any device — on ``meta``
    tensors it counts sizes this machine could not hold.

    Every storage an operator creates is added when created and removed when freed; tensors made
    before (the model's weights, the batch) are added with ``add``. On ``meta``, a Python scalar
    read (``.item()``, ``float()``) returns 1.0 so that code checking its loss still runs.
    """

    def __init__(self, device: str | torch.device | None = None):
        super().__init__()
        # Only this device's storages when given (max_memory_allocated counts one device; the host
        # batch a loader hands to a GPU step is not device memory), else every storage.
        self.device = None if device is None else torch.device(device).type
        self._seen = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def add(self, *tensors) -> None:
        for t in tree_flatten(list(tensors))[0]:
            self._track(t)

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        if storage in self._seen or (self.device is not None and storage.device.type != self.device):
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        meter = weakref.ref(self)

        def freed(_, size=size):
            owner = meter()
            if owner is not None:
                owner.live -= size

        self._seen[storage] = weakref.ref(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return 1.0 if args[0].is_floating_point() else 1
        if (func is torch.ops.aten._to_copy.default and args[0].device.type == "meta"
                and torch.device((kwargs or {}).get("device") or "meta").type == "cpu"):
            # the step's one fetch of its logged numbers (.tolist()): finite dummies, as above
            return torch.ones(args[0].shape, dtype=(kwargs or {}).get("dtype") or args[0].dtype)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out


@contextmanager
def fused_attention_on_meta():
    """On ``meta`` tensors PyTorch's scaled_dot_product_attention takes its math path, which keeps the
    latent × conditioning probabilities for backward; the CPU and CUDA fused kernels keep only the
    output and a log-sum-exp per row. Inside this block, meta calls go to the fused CPU kernel's
    meta function instead (set for the whole process: checkpointed blocks recompute in backward)."""
    plain = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if query.device.type == "meta" and not dropout_p and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, attn_mask=attn_mask, is_causal=is_causal)[0]
        return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def synthetic_batch(config: dict, seconds: float, text_tokens: int = 64, lyric_tokens: int = 300,
                    seed: int = 0) -> dict:
    """One batch in the cache's layout (cache.collate) with the real shapes for ``seconds``."""
    import random

    from cache.bench import synthetic_song
    from cache.collate import collate, make_sample

    k = transformer_dims(config)
    song = synthetic_song("memory", seconds, seed=seed, text_dim=k["text"], mert_dim=k["ssl_dims"][0],
                          mhubert_dim=k["ssl_dims"][1], text_len=text_tokens, lyric_len=lyric_tokens)
    batch = collate([make_sample(song, random.Random(seed), seconds)], k["speaker"], torch.bfloat16)
    batch["lyric_ids"] = batch["lyric_ids"] % k["vocab"]
    return batch


def count_step_memory(transformer_dir: str | Path, config, batch: dict, device: str = "meta",
                      steps: int = 2) -> dict:
    """Run ``steps`` of the product's training step (pipeline.train.train_step on the model from
    load_transformer_for_training) under TensorMemoryMeter; returns bytes: peak, the frozen
    weights, the LoRA, and what stays alive between steps (weights + LoRA + AdamW state, and the
    batch when it is on the device: on the CPU; a GPU step gets it from the host and frees it).

    ``device="meta"`` reads no weight (the folder needs only config.json) and computes nothing:
    the count for the full size takes seconds on any machine. ``config``: a TrainConfig."""
    from pipeline.objective import training_sigmas
    from pipeline.train import (
        PRECISION_DTYPES,
        _BatchStream,
        load_transformer_for_training,
        train_step,
    )

    device = torch.device(device)
    dtype = PRECISION_DTYPES[config.precision]
    model = load_transformer_for_training(transformer_dir, config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # The batch stays on the host, as the loaders give it: train_step moves it to the device (and,
    # reading its masks there, skips the masks of unpadded frames and tokens, as training does).
    # On the CPU the host batch is device memory too.
    meter = TensorMemoryMeter(device)
    meter.add(list(model.parameters()), batch)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    lora = sum(p.numel() * p.element_size() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=tuple(config.betas),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    source = _BatchStream([batch])
    generator = torch.Generator().manual_seed(config.seed)
    with fused_attention_on_meta(), meter:
        for _ in range(steps):
            train_step(model, source, optimizer, scheduler, params, generator, training_sigmas(config.shift),
                       config, device, dtype)
    return {"peak": meter.peak, "weights": weights, "lora": lora, "between_steps": meter.live,
            "tokens": int(batch["latents"].shape[-1]),
            "ssl_frames": [int(x[0].shape[0]) for x in (batch.get("mert"), batch.get("mhubert")) if x]}


@contextmanager
def config_folder(config: dict):
    """A temporary folder holding only ``config.json``: enough for count_step_memory on meta."""
    with tempfile.TemporaryDirectory(prefix="aceturbo-memory-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        yield Path(folder)


def check_against_meter(config: dict, seconds: float, rank: int, precision: str, gradient_checkpointing: Any,
                        lyric_tokens: int = 300, text_tokens: int = 64) -> dict:
    """The model's estimate next to the meter's count on ``meta`` for one setting (the docs' check)."""
    from pipeline.train_config import from_params

    # TrainConfig spells the setting as a boolean here (true = all, false = none); "k"/"auto" pass as given
    setting = {"all": True, "none": False}.get(str(gradient_checkpointing), gradient_checkpointing)
    train = from_params({"rank": rank, "precision": precision, "gradient_checkpointing": setting, "device": "cpu"})
    batch = synthetic_batch(config, seconds, text_tokens, lyric_tokens)
    with config_folder(config) as folder:
        counted = count_step_memory(folder, train, batch, "meta")
    est = estimate_training_memory(config, tokens=counted["tokens"], rank=rank, precision=precision,
                                   gradient_checkpointing=gradient_checkpointing, text_tokens=text_tokens,
                                   lyric_tokens=lyric_tokens, ssl_frames=counted["ssl_frames"])
    return {"seconds": seconds, "rank": rank, "precision": precision,
            "gradient_checkpointing": str(gradient_checkpointing), "tokens": counted["tokens"],
            "counted_peak": counted["peak"], "estimate": est.total, "ratio": est.total / counted["peak"],
            "estimate_parts": est.as_dict()}

