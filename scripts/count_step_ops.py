"""Count what one training step launches, at full size, on `meta` tensors (no GPU, no weights).

    python scripts/count_step_ops.py                         # 180 s song, r=64, bf16, checkpointing all
    python scripts/count_step_ops.py --checkpointing none --seconds 180 --rank 64

One optimizer step (train_step: forward, backward, clipping, AdamW) of the real
ACEStepTransformer2DModel with its LoRA runs under a TorchDispatchMode that sees every aten op: ops that only reshape a view launch no kernel and
are counted apart; every other op is roughly one GPU kernel in eager mode. For each op it adds the
FLOPs (torch's FLOP counter formulas) and the bytes read + written, and prints a roofline estimate
against one H100 SXM (989 TFLOP/s bf16 dense, 67 fp32 without tensor cores, 3.35 TB/s HBM, ~5 µs of
host time per eager kernel launch). The saved activations are measured with saved-tensor hooks, by
storage, without the frozen weights and their views (softmax attention is counted as CUDA's memory-efficient kernel, not the math path meta tensors would
take). It also counts the host's reads of device values (each a GPU→CPU sync on CUDA) and the
copies between host and device.
These are counts and estimates made on a CPU, not GPU timings: `aceturbo bench` on a GPU times it.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100 = {"bf16_flops": 989e12, "fp32_flops": 67e12, "bytes_per_s": 3.35e12, "launch_s": 5e-6}
# Ops that only make a new view (or metadata) of existing memory: no kernel.
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze", "slice",
    "select", "as_strided", "unflatten", "detach", "alias", "split", "split_with_sizes", "chunk", "unbind",
    "view_as", "_reshape_alias", "narrow", "lift_fresh", "empty", "empty_like", "empty_strided", "_to_copy_noop",
    "lift_fresh_copy", "set_", "_has_compatible_shallow_copy_type", "is_same_size", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "_local_scalar_dense", "resolve_conj", "resolve_neg", "diagonal", "movedim",
}
MATMUL_OPS = {"mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention_backward",
              "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
              "_efficient_attention_forward", "_efficient_attention_backward", "_flash_attention_forward",
              "_flash_attention_backward"}


def _bytes(tree) -> int:
    seen, total = set(), 0
    for t in torch.utils._pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class OpCounter(TorchDispatchMode):
    """Counts ops (kernels), FLOPs per op family, bytes read + written, H2D/D2H-like copies."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.views = 0
        self.bytes = 0
        self.flops = collections.Counter()  # by dtype family: bf16 / fp32
        self.elementwise_bytes = 0
        self.syncs = 0  # device -> host reads of a value
        self.transfers = collections.Counter()  # copies between the CPU and the (meta) device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense" and args[0].device.type == "meta":  # .item()/float(): a sync
            self.syncs += 1
            return False if args[0].dtype == torch.bool else 0
        if name == "_to_copy" and isinstance(args[0], torch.Tensor) and kwargs.get("device") is not None:
            source, target = args[0].device.type, torch.device(kwargs["device"]).type
            if (source, target) == ("meta", "cpu"):  # .cpu()/.tolist(): a sync
                self.syncs += 1
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if source != target:
                self.transfers[f"{source}_to_{target}"] += 1
        out = func(*args, **kwargs)
        if name in VIEW_OPS:
            self.views += 1
            return out
        self.ops[name] += 1
        moved = _bytes((args, kwargs)) + _bytes(out)
        self.bytes += moved
        flops = _op_flops(func, args, kwargs, out)
        if flops:
            dtypes = {t.dtype for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)}
            self.flops["fp32" if torch.float32 in dtypes and torch.bfloat16 not in dtypes else "bf16"] += flops
        elif name not in MATMUL_OPS:
            self.elementwise_bytes += moved
        return out


def _op_flops(func, args, kwargs, out) -> int:
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


def build(rank: int, dtype: torch.dtype, checkpointing: str, compile_buckets: bool = False):
    from pipeline.lora import LoraSettings, apply_lora
    from pipeline.models.transformer import ACEStepTransformer2DModel
    from pipeline.tiny.small import FULL_TRANSFORMER_CONFIG

    with torch.device("meta"):
        model = ACEStepTransformer2DModel(**FULL_TRANSFORMER_CONFIG).to(dtype)
        apply_lora(model, LoraSettings(r=rank, alpha=32.0, use_rslora=True), dtype=dtype)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    _set_checkpointing(model, checkpointing)
    model.train()
    return model


def _set_checkpointing(model, checkpointing: str) -> None:
    from pipeline import checkpointing as ckpt

    blocks = ckpt.plan_blocks(checkpointing, len(model.transformer_blocks))
    ckpt.apply(model, checkpointing, blocks)


def batch(seconds: float, text_tokens: int, lyric_tokens: int, dtype: torch.dtype) -> dict:
    from cache.schema import LATENT_RATE

    frames = int(seconds * LATENT_RATE)
    return {
        "keys": ["song"],
        "latents": torch.randn(1, 8, 16, frames, dtype=dtype),
        "latent_mask": torch.ones(1, frames, dtype=dtype),
        "text_states": torch.randn(1, text_tokens, 768, dtype=dtype),
        "text_mask": torch.ones(1, text_tokens, dtype=torch.long),
        "speaker": torch.zeros(1, 512, dtype=dtype),
        "lyric_ids": torch.randint(1, 6000, (1, lyric_tokens)),
        "lyric_mask": torch.ones(1, lyric_tokens, dtype=torch.long),
        "mert": [torch.randn(int(seconds * 75), 1024, dtype=dtype)],
        "mhubert": [torch.randn(int(seconds * 50), 768, dtype=dtype)],
    }


def _cuda_like_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """Softmax attention as CUDA runs it (the memory-efficient kernel, in the inputs' dtype), not the
    math path meta tensors take (fp32 upcast, probabilities kept). The mask changes no count."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, scale=scale)[0]


def count(seconds: float = 180.0, rank: int = 64, checkpointing: str = "all", text_tokens: int = 64,
          lyric_tokens: int = 300, precision: str = "bf16-true") -> dict:
    """One optimizer step (train_step: forward, backward, gradient clipping, AdamW) at full size."""
    from pipeline.train import PRECISION_DTYPES
    from pipeline.train_config import TrainConfig

    dtype = PRECISION_DTYPES[precision]
    model = build(rank, dtype, checkpointing)
    config = TrainConfig(rank=rank, precision=precision, gradient_checkpointing=checkpointing, device="cpu")
    data = batch(seconds, text_tokens, lyric_tokens, dtype)
    meta = torch.device("meta")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.8, 0.9), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # Saved tensors by the storage they keep alive: views of one tensor count once, and the frozen
    # weights (and their transposed views, which a linear layer keeps for its input gradient) not at
    # all — they are in memory anyway. The storages are held so that no id is reused meanwhile.
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage
        return t

    # the model's kernels: forward + backward
    counter = OpCounter()
    sdpa, torch.nn.functional.scaled_dot_product_attention = (torch.nn.functional.scaled_dot_product_attention,
                                                              _cuda_like_attention)
    try:
        return _count(model, config, data, meta, dtype, counter, pack, saved, optimizer, scheduler, params,
                      seconds, rank, checkpointing, precision)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def _count(model, config, data, meta, dtype, counter, pack, saved, optimizer, scheduler, params, seconds, rank,
           checkpointing, precision) -> dict:
    from pipeline.objective import training_sigmas
    from pipeline.train import _BatchStream, compute_loss, train_step

    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = compute_loss(model, data, torch.Generator().manual_seed(0), training_sigmas(), config, meta,
                                   dtype)
        forward_ops = sum(counter.ops.values())
        loss.backward()
    model.zero_grad(set_to_none=True)
    # the host's side of a whole optimizer step (the second one: the first creates AdamW's state).
    # AdamW's own kernels are not counted: on meta its multi-tensor kernels run tensor by tensor.
    for _ in range(2):
        host = OpCounter()
        with host:
            train_step(model, _BatchStream([data]), optimizer, scheduler, params, torch.Generator().manual_seed(0),
                       training_sigmas(), config, meta, dtype)
    lora = sum(p.numel() for p in params)
    total_ops = sum(counter.ops.values())
    est = {
        "matmul_s_bf16": counter.flops["bf16"] / H100["bf16_flops"],
        "matmul_s_fp32": counter.flops["fp32"] / H100["fp32_flops"],
        "elementwise_s": counter.elementwise_bytes / H100["bytes_per_s"],
        "launch_s": total_ops * H100["launch_s"],
    }
    return {
        "seconds": seconds, "tokens": int(data["latents"].shape[-1]), "rank": rank, "checkpointing": checkpointing,
        "precision": precision, "kernels": total_ops, "kernels_forward": forward_ops,
        "views": counter.views, "tflop_bf16": round(counter.flops["bf16"] / 1e12, 2),
        "tflop_fp32": round(counter.flops["fp32"] / 1e12, 3), "elementwise_gb": round(counter.elementwise_bytes / 1e9, 1),
        "saved_activations_gib": round(sum(s.nbytes() for s in saved.values()) / 2**30, 2), "lora_params_m": round(lora / 1e6, 1),
        "host_syncs_per_step": host.syncs, "transfers_per_step": dict(host.transfers),
        "top_ops": counter.ops.most_common(12),
        "h100_estimate_s": {k: round(v, 4) for k, v in est.items()},
        "h100_estimate_total_s": round(sum(v for k, v in est.items() if k != "launch_s"), 4),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--checkpointing", default="all")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--lyric-tokens", type=int, default=300)
    parser.add_argument("--precision", default="bf16-true")
    args = parser.parse_args(argv)
    result = count(args.seconds, args.rank, args.checkpointing, args.text_tokens, args.lyric_tokens, args.precision)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
