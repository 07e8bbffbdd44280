"""Memory of a LoRA training step, from the transformer's config: parameter counts and a memory model.

The model (``estimate_training_memory``) adds up what one step of ``pipeline.train`` holds on its
device — what ``torch.cuda.max_memory_allocated`` reports on a GPU:

    weights      the frozen transformer as loaded for training (without the cross-attention add_*
                 projections no forward pass uses: pipeline.train.UNUSED_IN_TRAINING)
    lora         the trainable LoRA A/B matrices, in the training precision
    gradients    one gradient per LoRA weight
    optimizer    AdamW's two moments per LoRA weight (same dtype as the weights)
    batch        the batch on the device: latents, noise and x_t, the SSL targets, text states
    activations  what autograd keeps for backward, per latent token (below), at the step's peak

Activations, in bytes per latent token, for width d = heads × head_dim, FFN hidden h = d × mlp_ratio,
s = bytes per element of the training dtype, c = 4 when s < 4 (an fp32 copy the code makes) else 0.
Counted from what autograd saves in pipeline/models as a GPU runs them (frozen Linear layers keep
nothing; a LoRA keeps its input; a saved view shares its tensor's memory):

    one DiT block (a_block)
        two RMSNorms          2·(s + c)·d        their input and its fp32 copy
        linear self-attention 3s·d + 4·(d + heads) + 4·heads   ReLU(q), ReLU(k) and V in the model
                                                 dtype (bf16 inputs, fp32 accumulation), the fp32
                                                 output with its normaliser column, normaliser + eps
        cross-attention       2s·d + 4·heads     the fused kernel's query, output and log-sum-exp
        GLUMBConv FFN         7s·h               SiLU input and output (2h), depthwise output (2h:
                                                 the value half and the gate), SiLU(gate) (h)
        LoRA inputs           s·d per distinct input (3 with the official targets: the modulated
                              norm1 output, the attention output, the residual into the cross-
                              attention's query) + s·r per adapted layer
    outside the blocks (a_head)
        SSL heads             8s·d               two projectors' SiLU inputs (2d wide, twice each)
        SSL losses            12·Σ frames_i·D_i / T    three fp32 copies of each resampled target
        final layer + loss    4·d + 4·C·16       the RMSNorm's fp32 input, the fp32 prediction
        RoPE tables           8·head_dim         fp32 cos and sin, made once per forward (not per block)
    a recomputing block keeps only its input (s·d); in backward it holds a_block again plus the
    gradient flowing through it (2s·d).

Peak, T latent tokens, n blocks of which k recompute (gradient checkpointing "all": k = n), G the
LoRA gradients, L lyric tokens over H lyric-encoder heads (its attention keeps [H, L, L] matrices):
    k = 0:  T·(n·a_block + a_head)                        the end of forward, no gradient yet
    k > 0:  the largest of  T·((n − k)·a_block + k·s·d + a_head)          the end of forward,
                            T·((n − k + 1)·a_block + 2s·d) + max(T·k·s·d, G)   a recomputing block's
                                backward (the saved inputs drain while the gradients fill up),
                            G + 8·s·H·L²                                  the lyric layers, last
    plus the conditioning sequence's K/V per kept block (2s·d + s·r per adapted K/V layer, per
    token) and its RoPE tables, and with k = 0 the lyric layers' 5·s·H·L² each.
    Memory = weights + LoRA + AdamW + batch + that peak (which includes G).

Checked against pipeline.memory_meter.count_step_memory (the product's own train_step run under
a meter that counts every live tensor on the step's device; the batch comes from the host): on CPU
tensors at the demo and small sizes, on ``meta`` tensors at the full size (tests/test_memory.py;
docs/benchmarks.md lists the numbers). This module imports no torch: the bench's parent process
estimates before it starts anything. Left out: what does not grow with the tokens (the linear
attention's [heads, head_dim, head_dim + 1] sums, the modulation rows: under 1 MiB per block at full
size) and the losses' short-lived temporaries at the end of forward (under 1 % at full size). On a
CPU, bf16 linear attention casts q, k, v to fp32 first (no bf16 matmul with fp32 output there): a
CPU bf16 run keeps more than this model, which describes a GPU.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.train_config import OFFICIAL_TARGETS

GiB = 2**30
MiB = 2**20
LATENT_HEIGHT = 16  # latent rows per frame (the patch covers all of them: one token per frame)
# cache.schema's frame rates, repeated so that estimating imports no torch (the bench's parent
# process estimates before starting anything; tests/test_memory.py checks they agree).
LATENT_RATE, MERT_RATE, MHUBERT_RATE = 44100 / 4096, 75.0, 50.0


# ====================================================================================== parameters
def transformer_dims(config: dict) -> dict:
    d = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 64))
    patch = config.get("patch_size", [16, 1])
    return dict(
        d=d, heads=int(config.get("num_attention_heads", 24)), head_dim=int(config.get("attention_head_dim", 64)),
        layers=int(config.get("num_layers", 28)), ff=int(d * float(config.get("mlp_ratio", 4.0))),
        in_ch=int(config.get("in_channels", 8)), patch=int(patch[0]) * int(patch[1]),
        out_ch=int(config.get("out_channels", 8)), speaker=int(config.get("speaker_embedding_dim", 512)),
        text=int(config.get("text_embedding_dim", 768)), vocab=int(config.get("lyric_encoder_vocab_size", 6681)),
        lyr_in=int(config.get("lyric_hidden_size", 1024)), lyr=int(config.get("lyric_encoder_output_size", 1024)),
        lyr_ff=int(config.get("lyric_encoder_linear_units", 4096)),
        lyr_blocks=int(config.get("lyric_encoder_num_blocks", 6)),
        lyr_heads=int(config.get("lyric_encoder_attention_heads", 16)),
        ssl_dims=[int(x) for x in config.get("ssl_latent_dims", [1024, 768])],
    )


def transformer_params(config: dict) -> dict[str, int]:
    """Parameter counts of ACEStepTransformer2DModel from its config (spec §2.1), by part.

    ``latent_path``: the weights every latent token goes through (DiT blocks without the unused
    cross-attention add_* projections and without the cross-attention K/V, which see the
    conditioning tokens; patch embedding, final layer, SSL heads). ``loaded_for_training``: all
    but ``cross_attn_unused`` (pipeline.train.UNUSED_IN_TRAINING)."""
    k = transformer_dims(config)
    d, ff = k["d"], k["ff"]
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    attn_self = 4 * lin(d, d)
    cross_used_latent = 2 * lin(d, d)  # to_q, to_out.0
    cross_kv = 2 * lin(d, d)  # to_k, to_v (conditioning tokens)
    cross_unused = 4 * lin(d, d)  # add_q/k/v_proj, to_add_out: in the checkpoint, never used
    ffn = lin(d, 2 * ff) + (2 * ff * 3 + 2 * ff) + lin(ff, d, bias=False)
    block_latent = 6 * d + attn_self + cross_used_latent + ffn
    blocks = k["layers"] * (block_latent + cross_kv + cross_unused)
    hidden = k["in_ch"] * 256
    proj_in = hidden * k["in_ch"] * k["patch"] + hidden + 2 * hidden + lin(hidden, d)
    final = 2 * d + lin(d, k["patch"] * k["out_ch"])
    projectors = sum(lin(d, 2 * d) + lin(2 * d, 2 * d) + lin(2 * d, od) for od in k["ssl_dims"])
    timestep = lin(256, d) + lin(d, d) + lin(d, 6 * d)
    D, U = k["lyr"], k["lyr_ff"]
    lyric_layer = 4 * lin(D, D) + D * D + 2 * D + lin(D, U) + lin(U, D) + 4 * D
    lyric = k["vocab"] * k["lyr_in"] + lin(k["lyr_in"], D) + 2 * D + k["lyr_blocks"] * lyric_layer + 2 * D
    cond = lin(k["speaker"], d) + lin(k["text"], d) + lyric + lin(D, d)
    total = blocks + proj_in + final + projectors + timestep + cond
    return {
        "total": total,
        "blocks": blocks,
        "latent_path": k["layers"] * block_latent + proj_in + final + projectors,
        "cross_attn_unused": k["layers"] * cross_unused,
        "loaded_for_training": total - k["layers"] * cross_unused,
        "conditioning": cond + k["layers"] * cross_kv,
    }


def lora_params(config: dict, rank: int, targets=OFFICIAL_TARGETS) -> int:
    """Trainable LoRA parameters (spec §7: 211 wrapped layers for the official target list)."""
    k = transformer_dims(config)
    d, D = k["d"], k["lyr"]
    n = 0
    per_block = sum(1 for t in ("to_q", "to_k", "to_v", "to_out.0") if t in targets)
    n += 2 * k["layers"] * per_block * rank * (d + d)  # attn and cross_attn
    n += k["lyr_blocks"] * sum(1 for t in ("linear_q", "linear_k", "linear_v") if t in targets) * rank * (D + D)
    if "speaker_embedder" in targets:
        n += rank * (k["speaker"] + d)
    return n


# ====================================================================================== the model
def latent_tokens(seconds: float) -> int:
    """Latent frames (= DiT tokens) of ``seconds`` of audio."""
    return int(seconds * LATENT_RATE)


def checkpointed_blocks(setting: Any, num_blocks: int) -> int:
    """How many DiT blocks recompute in backward for a gradient_checkpointing setting: true/"all" →
    all, false/"none" → 0, an integer k ≥ 2 → every k-th block. "auto" counts as all (its least
    memory: auto only recomputes fewer blocks when they fit); "k of N" (a resolved plan) → k."""
    if isinstance(setting, bool):
        return num_blocks if setting else 0
    text = str(setting).strip().lower()
    if " of " in text and text.split(" of ")[0].isdigit():  # "k of N", as training summaries describe a plan
        return min(num_blocks, int(text.split(" of ")[0]))
    if text in ("none", "false", "no", "off", "0"):
        return 0
    if text.isdigit() and int(text) >= 2:
        return math.ceil(num_blocks / int(text))
    return num_blocks


@dataclass
class MemoryEstimate:
    """Bytes one training step holds on its device at its peak, by part (see the module docstring)."""

    weights: int
    lora: int
    gradients: int
    optimizer: int
    batch: int
    activations: int
    tokens: int
    rank: int
    precision: str
    checkpointed_blocks: int
    num_blocks: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.gradients + self.optimizer + self.batch + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def summary(self) -> str:
        """One line: total and parts in GiB."""
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        return (f"{g(self.total)} GiB (weights {g(self.weights)}, LoRA + gradients + AdamW "
                f"{g(self.lora + self.gradients + self.optimizer)}, activations {g(self.activations)}, "
                f"batch {g(self.batch)})")


def activation_coefficients(config: dict, precision: str = "bf16-true", rank: int = 64,
                            targets=OFFICIAL_TARGETS) -> dict[str, float]:
    """Bytes per latent token (a_block, a_head, block_input, backward) and per conditioning token
    and block (cond_block) of the module docstring's formula."""
    k = transformer_dims(config)
    d, h, heads, hd = k["d"], k["ff"], k["heads"], k["head_dim"]
    s = 2 if precision == "bf16-true" else 4
    c = 4 if s < 4 else 0
    attn_in = any(t in targets for t in ("to_q", "to_k", "to_v"))
    lora_inputs = int(attn_in) + int("to_out.0" in targets) + int("to_q" in targets)
    lora_latent_layers = sum(1 for t in ("to_q", "to_k", "to_v", "to_out.0") if t in targets) \
        + sum(1 for t in ("to_q", "to_out.0") if t in targets)
    a_block = (2 * (s + c) * d                       # norm1, norm2: input and fp32 copy
               + 3 * s * d + 4 * (d + heads) + 4 * heads  # linear self-attention
               + 2 * s * d + 4 * heads               # cross-attention (fused kernel: query, output, LSE)
               + 7 * s * h                           # GLUMBConv
               + s * d * lora_inputs + s * rank * lora_latent_layers)
    lora_cond = sum(1 for t in ("to_k", "to_v") if t in targets)
    cond_block = 2 * s * d + s * rank * lora_cond  # the kernel's K and V, the LoRA K/V inputs
    rope = 8 * hd  # fp32 cos/sin tables per token, made once per forward
    return {"a_block": a_block, "block_input": s * d, "backward": 2 * s * d, "cond_block": cond_block,
            "cond_fixed": s * d + rope,
            "a_head_fixed": 8 * s * d + 4 * d + 4 * k["in_ch"] * LATENT_HEIGHT + rope, "bytes": s}


def estimate_training_memory(config: dict, seconds: float | None = None, *, tokens: int | None = None,
                             rank: int = 64, precision: str = "bf16-true", gradient_checkpointing: Any = True,
                             batch: int = 1, text_tokens: int = 64, lyric_tokens: int = 300,
                             ssl_frames: list[int] | None = None, targets=OFFICIAL_TARGETS,
                             skip_unused: bool = True) -> MemoryEstimate:
    """Peak device memory of one LoRA training step (the module docstring's model).

    ``config``: the transformer's config.json; ``seconds`` (or ``tokens``): the training window per
    sample; ``ssl_frames``: MERT and mHuBERT frames per sample (default: from the frame rates)."""
    if tokens is None:
        if seconds is None:
            raise ValueError("give seconds or tokens")
        tokens = latent_tokens(seconds)
    k = transformer_dims(config)
    n = k["layers"]
    coef = activation_coefficients(config, precision, rank, targets)
    s = coef["bytes"]
    if ssl_frames is None:
        seconds_ = tokens / LATENT_RATE
        ssl_frames = [int(seconds_ * MERT_RATE), int(seconds_ * MHUBERT_RATE)]
    ssl_elems = sum(f * dim for f, dim in zip(ssl_frames, k["ssl_dims"]))
    a_head = coef["a_head_fixed"] + 12 * ssl_elems / max(1, tokens)
    ckpt = checkpointed_blocks(gradient_checkpointing, n)
    lora = lora_params(config, rank, targets)
    grads = lora * s
    kept = (n - ckpt) * coef["a_block"]
    cond_tokens = 1 + text_tokens + lyric_tokens
    cond = batch * cond_tokens * (((n - ckpt) + (1 if ckpt else 0)) * coef["cond_block"] + coef["cond_fixed"])
    # The lyric Conformer's attention keeps [heads, L, L] matrices: quadratic in the lyric length.
    lyric_square = batch * k["lyr_heads"] * lyric_tokens**2 * s
    tokens_all = batch * tokens
    if ckpt:
        # Three candidates: the end of forward (SSL heads alive, no gradient yet); the backward of a
        # recomputing block, where the saved block inputs drain while the LoRA gradients fill up; the
        # lyric encoder's recomputed layer, last in backward (all gradients there).
        end_of_forward = tokens_all * (kept + ckpt * coef["block_input"] + a_head)
        in_backward = tokens_all * (kept + coef["a_block"] + coef["backward"]) \
            + max(tokens_all * ckpt * coef["block_input"], grads)
        lyric_backward = grads + 8 * lyric_square
        peak = max(end_of_forward, in_backward, lyric_backward) + cond
    else:  # the end of forward (no gradient yet), or the lyric layers' backward (last)
        saved_lyric = 5 * k["lyr_blocks"] * lyric_square
        peak = max(tokens_all * (kept + a_head) + cond + saved_lyric, grads + saved_lyric + 3 * lyric_square)
    activations = int(peak) - grads
    params = transformer_params(config)
    loaded = params["loaded_for_training"] if skip_unused else params["total"]
    latent_elems = 3 * k["in_ch"] * LATENT_HEIGHT * tokens  # x0, noise, x_t
    batch_bytes = batch * s * (latent_elems + ssl_elems + text_tokens * k["text"] + k["speaker"])
    return MemoryEstimate(weights=loaded * s, lora=lora * s, gradients=grads, optimizer=2 * lora * s,
                          batch=int(batch_bytes), activations=activations, tokens=tokens, rank=rank,
                          precision=precision, checkpointed_blocks=ckpt, num_blocks=n)


def memory_table(config: dict, ranks=(16, 64, 256), seconds=(60, 180, 240), precision: str = "bf16-true",
                 checkpointing=("all", "none")) -> list[dict]:
    """The estimate for every rank × song length × checkpointing setting (docs/benchmarks.md)."""
    rows = []
    for setting in checkpointing:
        for sec in seconds:
            for rank in ranks:
                est = estimate_training_memory(config, sec, rank=rank, precision=precision,
                                               gradient_checkpointing=setting)
                rows.append({"rank": rank, "seconds": sec, "gradient_checkpointing": setting, **est.as_dict()})
    return rows


def out_of_memory_advice(estimate: MemoryEstimate, setting_names: dict[str, str] | None = None,
                         fitting_rank: int | None = None) -> str:
    """What to lower, first what saves most: checkpointing when off, then the window, then the rank.
    ``setting_names`` maps rank/seconds/checkpointing to how the caller spells them (CLI flags);
    ``fitting_rank``: the largest rank that fits with the other settings unchanged, when known."""
    names = {"rank": "rank", "seconds": "max_seconds", "checkpointing": "gradient_checkpointing: true",
             "precision": "precision", **(setting_names or {})}
    fixes = []
    if estimate.checkpointed_blocks < estimate.num_blocks:
        fixes.append(f"recompute every block ({names['checkpointing']})")
    if estimate.precision != "bf16-true":
        fixes.append(f"use {names['precision']} bf16-true")
    rank = f" to {fitting_rank} or less" if fitting_rank else ""
    fixes += [f"lower {names['seconds']}", f"lower {names['rank']}{rank} (now {estimate.rank})"]
    return ", or ".join(fixes)


# ====================================================================================== host memory
def host_memory() -> dict[str, float]:
    """This process's resident memory in MiB from /proc/self/status: peak (VmHWM), now (VmRSS), and
    now split into anonymous (the process's own) and file-backed (mapped files) pages."""
    keys = {"VmHWM": "peak_rss_mb", "VmRSS": "rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb"}
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in keys:
                out[keys[key]] = int(line.split()[1]) / 1024.0
    except OSError:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (VmHWM) back to its current RSS (Linux ≥ 4.0); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
