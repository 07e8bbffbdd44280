"""The lyric encoder: a wenet/CosyVoice-style Conformer without convolution module (spec §2.3).

Layout (parameter names as in the released checkpoint, under ``lyric_encoder.``):

    embed.out = [Linear(in→d), LayerNorm(d), Dropout]   then ×sqrt(d) and ESPnet relative positions
    encoders.J = pre-norm block: x += Drop(RelPosMHA(norm_mha(x))); x += Drop(FFN(norm_ff(x)))
    after_norm = LayerNorm(d)

Relative positions follow ESPnet's "new" scheme: a sin/cos table over the offsets (L-1) … -(L-1),
projected by ``linear_pos`` and combined Transformer-XL style with the learned biases
``pos_bias_u``/``pos_bias_v``; ``rel_shift`` turns the [L, 2L-1] score table into query-key offsets.
The attention mask is full (no chunking): only padded keys are masked. All dropouts (0.1) are active
in train mode only, as in the official trainer.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_table(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """ESPnet relative sin/cos table [1, 2L-1, dim]; row j encodes the offset (L-1-j).

    Even channels hold sin(offset·w_k), odd channels cos(offset·w_k), w_k = 10000^(-2k/dim).
    """
    offsets = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32)[:, None]
    div_term = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * -(math.log(10000.0) / dim)
    )
    angles = offsets * div_term
    table = torch.zeros(2 * length - 1, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.unsqueeze(0).to(dtype)


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """[B, H, L, 2L-1] scores per (query, table row) → [B, H, L, L] per (query i, key j).

    Table row r encodes offset L-1-r; the entry for (i, j) is the one with offset i-j, i.e. row
    L-1-i+j.
    """
    length = scores.size(-2)
    i = torch.arange(length, device=scores.device)[:, None]
    j = torch.arange(length, device=scores.device)[None, :]
    index = (length - 1 - i + j).expand(*scores.shape[:-2], length, length)
    return scores.gather(-1, index)


class RelPositionMultiHeadedAttention(nn.Module):
    """Transformer-XL style multi-head attention with relative positions (``self_attn``)."""

    def __init__(self, heads: int, dim: int, dropout: float = 0.0):
        super().__init__()
        assert dim % heads == 0, "lyric encoder width must divide into heads"
        self.heads = heads
        self.head_dim = dim // heads
        # Learned content/position biases (u, v of Transformer-XL). Registered before the linears so
        # the state-dict order matches the checkpoint's.
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.head_dim))
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))  # [B, L, H, D]

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, pos_emb: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.linear_q(x))
        k = self._heads(self.linear_k(x)).transpose(1, 2)  # [B, H, L, D]
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        p = self._heads(self.linear_pos(pos_emb)).transpose(1, 2)  # [1, H, 2L-1, D]
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = q_u @ k.transpose(-1, -2)
        position = rel_shift(q_v @ p.transpose(-1, -2))
        scores = (content + position) / math.sqrt(self.head_dim)
        if key_mask is None:  # nothing padded
            attn = torch.softmax(scores, dim=-1)
        else:  # padded keys: -inf before the softmax and exactly 0 after it (a fully padded row stays 0)
            pad = ~key_mask[:, None, None, :]
            attn = torch.softmax(scores.masked_fill(pad, float("-inf")), dim=-1).masked_fill(pad, 0.0)
        out = self.dropout(attn) @ v
        return self.linear_out(out.transpose(1, 2).flatten(2))


class PositionwiseFeedForward(nn.Module):
    """w_2(Dropout(SiLU(w_1 x)))."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class ConformerEncoderLayer(nn.Module):
    """Pre-norm block with attention and FFN only (no macaron FFN, no convolution module)."""

    def __init__(self, dim: int, heads: int, linear_units: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, dim, attention_dropout)
        self.feed_forward = PositionwiseFeedForward(dim, linear_units, dropout)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-5)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm_mha(x), key_mask, pos_emb))
        x = x + self.dropout(self.feed_forward(self.norm_ff(x)))
        return x


class LinearEmbed(nn.Module):
    """Input stage: Linear → LayerNorm → Dropout, ×sqrt(d), then relative positions (+dropout)."""

    def __init__(self, in_dim: int, dim: int, dropout: float, positional_dropout: float):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=1e-5), nn.Dropout(dropout))
        self.dim = dim
        self.xscale = math.sqrt(dim)
        self.pos_dropout = nn.Dropout(positional_dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * self.xscale
        pos_emb = relative_position_table(x.size(1), self.dim, device=x.device, dtype=x.dtype)
        # ESPnet applies the positional dropout to both the scaled input and the position table.
        return self.pos_dropout(x), self.pos_dropout(pos_emb)


class ConformerEncoder(nn.Module):
    """The lyric Conformer (released sizes: 1024 wide, 16 heads, FFN 4096, 6 blocks)."""

    def __init__(
        self,
        input_size: int = 1024,
        output_size: int = 1024,
        attention_heads: int = 16,
        linear_units: int = 4096,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
    ):
        super().__init__()
        self.embed = LinearEmbed(input_size, output_size, dropout_rate, positional_dropout_rate)
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)
        self.encoders = nn.ModuleList(
            ConformerEncoderLayer(output_size, attention_heads, linear_units, dropout_rate, attention_dropout_rate)
            for _ in range(num_blocks)
        )
        # diffusers' enable_gradient_checkpointing() finds this attribute and sets it (spec §2.10).
        self.gradient_checkpointing = False

    def forward(self, xs: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """xs [B, L, input_size], mask [B, L] (1 valid / 0 pad; None: nothing padded) →
        ([B, L, output_size], bool mask or None)."""
        key_mask = None if mask is None else mask.bool()
        xs, pos_emb = self.embed(xs)
        for layer in self.encoders:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                xs = self._gradient_checkpointing_func(layer, xs, key_mask, pos_emb)
            else:
                xs = layer(xs, key_mask, pos_emb)
        return self.after_norm(xs), key_mask
