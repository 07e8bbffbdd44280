"""Attention of the ACE-Step v1 DiT (spec §2.6–§2.8).

Two kinds live in every block:

* ``LinearSelfAttention`` (``attn``): ReLU-kernel linear attention over the latent tokens, with RoPE,
  its sums over the tokens accumulated in fp32 (§2.6). No softmax, no 1/sqrt(d).
* ``CrossAttention`` (``cross_attn``): ordinary softmax attention from latent tokens to the
  conditioning sequence (speaker, text, lyrics), RoPE on both sides (§2.7). It also owns the
  ``add_*_proj`` / ``to_add_out`` weights that the released checkpoint carries but never uses, so
  the parameter names match the checkpoint one to one.

RoPE reproduces the checkpoint's quirk (§2.8): the cos/sin tables use the "half-split" layout
(element j uses frequency j mod D/2) while the rotation pairs *adjacent* elements (2k, 2k+1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RopeTables = tuple[torch.Tensor, torch.Tensor]


def rope_tables(length: int, head_dim: int, theta: float, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> RopeTables:
    """cos/sin tables [length, head_dim] for positions 0..length-1, rounded to the activations'
    ``dtype`` (as the reference casts them) and held in fp32 for the product in apply_rope: made once
    per forward pass, not once per attention call.

    inv_freq[i] = theta^(-2i/head_dim); the table is [freqs, freqs] (so element j uses inv_freq[j mod
    head_dim/2]). Computed on demand instead of cached in a buffer: identical values, nothing to
    re-materialise when the model is built on the meta device.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    positions = torch.arange(length, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    table = torch.cat((freqs, freqs), dim=-1)
    return table.cos().to(dtype).float(), table.sin().to(dtype).float()


def apply_rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate ``x`` [B, H, S, D] with the checkpoint's adjacent-pair rotation (§2.8).

    rot(x)[2k] = -x[2k+1], rot(x)[2k+1] = x[2k]; out = x·cos + rot(x)·sin, the product formed in
    fp32 with the tables of rope_tables(..., dtype=x.dtype), then cast back.
    """
    cos, sin = tables
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-odd, even), dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # [B, S, H·D] -> [B, H, S, D]; channel index = head·D + d.
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    # [B, H, S, D] -> [B, S, H·D]
    return x.transpose(1, 2).flatten(2)


class LinearSelfAttention(nn.Module):
    """ReLU linear attention with RoPE (the checkpoint's ``attn``; spec §2.6)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-15):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.eps = eps
        self.to_q = nn.Linear(dim, inner, bias=True)
        self.to_k = nn.Linear(dim, inner, bias=True)
        self.to_v = nn.Linear(dim, inner, bias=True)
        # A ModuleList so that "to_out.0" exists: the official LoRA targets that name.
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True), nn.Dropout(0.0)])

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, rope: RopeTables
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        q = apply_rope(_split_heads(self.to_q(hidden_states), self.heads), rope)
        k = apply_rope(_split_heads(self.to_k(hidden_states), self.heads), rope)
        v = _split_heads(self.to_v(hidden_states), self.heads)
        if attention_mask is not None:
            # Padded latent frames contribute nothing to the sums and produce zero queries.
            m = attention_mask[:, None, :, None].to(q.dtype)
            q, k, v = q * m, k * m, v * m
        # The kernel feature map is ReLU. The reference casts q, k, v to fp32; here the sums over the
        # tokens take the model-dtype values with fp32 accumulation and output (the same products:
        # bf16 × bf16 is exact in fp32), on tensor cores. Σ_s k_s joins kᵀv as one more column, so a
        # single product with q gives the numerator and the normaliser Σ_s k_s·q_t together.
        q, k = F.relu(q), F.relu(k)
        kv = matmul_fp32(k.transpose(-1, -2), v)  # [B, H, D, D]
        kv = torch.cat((kv, k.sum(dim=-2, dtype=torch.float32).unsqueeze(-1)), dim=-1)  # [B, H, D, D+1]
        out = matmul_fp32(q, kv)  # [B, H, S, D+1]
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        if dtype == torch.float16:
            out = out.clamp(-65504.0, 65504.0)
        out = _merge_heads(out).to(dtype)
        return self.to_out[1](self.to_out[0](out))


# Devices whose matmul takes bf16/fp16 inputs and writes fp32 (torch.bmm(..., out_dtype=)); meta
# too, so that a trace on meta tensors sees what a GPU runs.
_FP32_OUT_DEVICES = ("cuda", "meta")


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 (batched over the leading dims). With a 16-bit ``a`` on a GPU both go in as
    ``a``'s dtype (tensor cores, fp32 accumulation and output; an fp32 ``b`` is rounded to it, which
    adds ~5 % to the output's own bf16 rounding error); elsewhere both are cast to fp32 first (the
    reference)."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.device.type in _FP32_OUT_DEVICES:
        return _MatmulFp32Out.apply(a, b.to(a.dtype))
    return a.float() @ b.float()


class _MatmulFp32Out(torch.autograd.Function):
    """16-bit a @ b with an fp32 result; torch.bmm's out_dtype variant has no autograd formula. The
    gradients come back in the inputs' dtype (as the reference's casts would give them)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        out = torch.bmm(a.flatten(0, -3), b.flatten(0, -3), out_dtype=torch.float32)
        return out.unflatten(0, a.shape[:-2])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        return grad @ b.transpose(-1, -2), a.transpose(-1, -2) @ grad


class CrossAttention(nn.Module):
    """Softmax cross-attention latent → conditioning, RoPE on both sides (spec §2.7)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=True)
        self.to_k = nn.Linear(dim, inner, bias=True)
        self.to_v = nn.Linear(dim, inner, bias=True)
        # Present in the released checkpoint (created by the upstream attention class with
        # added_kv_proj_dim) but never used in forward; kept only so the names load both ways.
        self.add_k_proj = nn.Linear(dim, inner, bias=True)
        self.add_v_proj = nn.Linear(dim, inner, bias=True)
        self.add_q_proj = nn.Linear(dim, inner, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, dim, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        rope: RopeTables,
        rope_cross: RopeTables,
    ) -> torch.Tensor:
        q = apply_rope(_split_heads(self.to_q(hidden_states), self.heads), rope)
        k = apply_rope(_split_heads(self.to_k(encoder_hidden_states), self.heads), rope_cross)
        v = _split_heads(self.to_v(encoder_hidden_states), self.heads)
        mask = None
        if encoder_attention_mask is not None:
            # Key-padding mask [B, 1, 1, L_enc] (True = attend).
            mask = (encoder_attention_mask != 0)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        if attention_mask is not None:
            # The reference masks the outer product latent×conditioning, so a padded latent row has no
            # allowed key; PyTorch's SDPA then yields zeros for that row. Zeroing explicitly gives the
            # same result on every backend (some would give NaN for a fully masked row).
            out = out * attention_mask[:, None, :, None].to(out.dtype)
        out = _merge_heads(out).to(q.dtype)
        return self.to_out[1](self.to_out[0](out))
