"""Gradient checkpointing as a choice: which DiT blocks recompute their activations in backward.

`gradient_checkpointing` (a TrainConfig setting):

- ``all``: every block recomputes (least memory; ~30 % more compute per step),
- ``none``: every block keeps its activations (fastest; ~0.7 GiB per block at a 3-minute song),
- ``k`` (an integer ≥ 2): every k-th block recomputes (blocks 0, k, 2k, ...),
- ``auto`` (default): the fewest recomputing blocks whose activations fit the device's free memory,
  estimated from what each block keeps alive in one forward pass traced on ``meta`` tensors under
  pipeline.memory_meter's TensorMemoryMeter (no memory, no compute) at the longest batch the run
  can see.

The old boolean spelling still works: true = all, false = none.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cache.schema import LATENT_RATE, MERT_RATE
from pipeline.train_config import normalize_checkpointing as normalize

# Kept free on top of the estimate: the CUDA caching allocator's fragmentation, cuBLAS/SDPA
# workspaces and the gradients flowing through one block in backward.
MARGIN_BYTES = 2 << 30
MARGIN_FRACTION = 0.08


def plan_blocks(setting: str, num_blocks: int) -> list[int]:
    """The blocks that recompute, for every setting but auto."""
    setting = normalize(setting)
    if setting == "auto":
        raise ValueError("resolve 'auto' with auto_blocks() first")
    if setting == "all":
        return list(range(num_blocks))
    if setting == "none":
        return []
    return list(range(0, num_blocks, int(setting)))


def apply(model, setting: str, blocks: list[int]) -> None:
    """Make ``blocks`` of the transformer recompute in backward. The lyric encoder recomputes unless the
    setting is none: it is cheap to redo (6 layers over the lyrics) and runs last in backward."""
    model.set_checkpointed_blocks(blocks, lyric_encoder=normalize(setting) != "none")


@dataclass
class ActivationEstimate:
    """Bytes autograd keeps for backward in one training forward pass, without checkpointing."""

    per_block: int  # the largest of the DiT blocks (what it keeps alive, its output included)
    block_input: int  # what a recomputing block keeps instead: its input hidden states
    other: int  # everything outside the blocks (embeddings, lyric encoder, final layer, SSL heads)
    num_blocks: int

    def needed(self, recomputing: int) -> int:
        """The peak of saved activations when the first ``recomputing`` blocks recompute. Backward runs
        from the last block to the first, so the kept blocks are freed before the first recompute;
        the peak is either at its start (every kept block) or while one block is redone."""
        kept = self.num_blocks - recomputing
        working = max(kept * self.per_block, self.per_block if recomputing else 0)
        return self.other + recomputing * self.block_input + working


def estimate_activations(model, tokens: int, text_tokens: int, lyric_tokens: int, batch: int = 1) -> ActivationEstimate:
    """Trace one forward of ``model`` (its LoRA included) on ``meta`` tensors of these sizes under
    pipeline.memory_meter's TensorMemoryMeter, and read at each DiT block's end what it left alive:
    the tensors autograd keeps for its backward and its output (the next block's input). Forward
    only, without the weights: the per-block split that ``auto`` needs; count_step_memory runs the
    whole step under the same meter for its peak. Costs no device memory; a few seconds of CPU at
    full size."""
    from pipeline.memory_meter import TensorMemoryMeter, fused_attention_on_meta

    config = model.config
    dtype = next(model.parameters()).dtype
    meta = torch.device("meta")
    params = {name: torch.empty_like(p, device=meta).requires_grad_(p.requires_grad)
              for name, p in model.named_parameters()}
    params.update({name: torch.empty_like(b, device=meta) for name, b in model.named_buffers()})
    width = config.num_attention_heads * config.attention_head_dim
    ssl_frames = int(tokens / LATENT_RATE * MERT_RATE)  # the longer of the two SSL streams
    ssl = [[torch.empty(ssl_frames, d, dtype=dtype, device=meta) for _ in range(batch)] for d in config.ssl_latent_dims]
    inputs = dict(
        hidden_states=torch.empty(batch, config.in_channels, 16, tokens, dtype=dtype, device=meta),
        attention_mask=None,
        encoder_text_hidden_states=torch.empty(batch, text_tokens, config.text_embedding_dim, dtype=dtype, device=meta),
        text_attention_mask=torch.ones(batch, text_tokens, dtype=torch.long, device=meta),
        speaker_embeds=torch.empty(batch, config.speaker_embedding_dim, dtype=dtype, device=meta),
        lyric_token_idx=torch.zeros(batch, lyric_tokens, dtype=torch.long, device=meta),
        lyric_mask=torch.ones(batch, lyric_tokens, dtype=torch.long, device=meta),
        timestep=torch.empty(batch, device=meta),
        ssl_hidden_states=ssl,
    )
    meter = TensorMemoryMeter()
    meter.add(list(params.values()), inputs)  # there before: a view of a weight (W.t()) is not new memory
    baseline = meter.live
    before, by_block = [0], []
    hooks = []
    for block in model.transformer_blocks:
        hooks.append(block.register_forward_pre_hook(lambda m, a: before.__setitem__(0, meter.live)))
        hooks.append(block.register_forward_hook(lambda m, a, o: by_block.append(meter.live - before[0])))
    previous = model.checkpointed_blocks, model.lyric_encoder.gradient_checkpointing
    model.set_checkpointed_blocks([], lyric_encoder=True)  # what auto runs with: see apply()
    try:
        # the fused attention kernels' memory (the CUDA ones keep no attention probabilities)
        with fused_attention_on_meta(), meter:
            output = torch.func.functional_call(model, params, (), inputs)
            alive = meter.live  # everything kept for backward, while the output holds the graph
        del output
    finally:
        for hook in hooks:
            hook.remove()
        model.set_checkpointed_blocks(*previous)
    return ActivationEstimate(per_block=max(by_block), block_input=batch * tokens * width * dtype.itemsize,
                              other=alive - baseline - sum(by_block), num_blocks=len(by_block))


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes: the GPU's (after the model is loaded), or the RAM still available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    import psutil

    memory = psutil.virtual_memory()
    return memory.available, memory.total


def auto_blocks(estimate: ActivationEstimate, free: int, total: int, reserved: int = 0) -> list[int]:
    """The fewest recomputing blocks whose estimate fits ``free`` − ``reserved`` − margin (the first
    ones: see ActivationEstimate.needed); all of them when even that does not fit."""
    budget = free - reserved - MARGIN_BYTES - int(MARGIN_FRACTION * total)
    for recomputing in range(estimate.num_blocks + 1):
        if estimate.needed(recomputing) <= budget:
            return list(range(recomputing))
    return list(range(estimate.num_blocks))


def resolve(model, setting: str, device: torch.device, tokens: int, batch: int = 1) -> list[int]:
    """The blocks that recompute for ``setting``; ``auto`` is estimated at ``tokens`` latent frames
    per sample and the longest prompt and lyrics (256 and 4096 tokens, the encoders' limits)."""
    from pipeline.models.text_encoder import MAX_TEXT_TOKENS
    from pipeline.text.lyrics import MAX_LYRIC_TOKENS

    setting = normalize(setting)
    num_blocks = len(model.transformer_blocks)
    if setting != "auto":
        return plan_blocks(setting, num_blocks)
    estimate = estimate_activations(model, tokens, MAX_TEXT_TOKENS, MAX_LYRIC_TOKENS, batch)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    free, total = free_memory(device)
    return auto_blocks(estimate, free, total, reserved=3 * trainable)  # gradients + AdamW's two moments


def describe(blocks: list[int], num_blocks: int) -> str:
    """A short name of a plan for logs and summaries: "all", "none" or "k of N"."""
    if len(blocks) == num_blocks:
        return "all"
    return "none" if not blocks else f"{len(blocks)} of {num_blocks}"
