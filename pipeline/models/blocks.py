"""Building blocks of the ACE-Step v1 DiT (spec §2.4, §2.5): patch embedding, the Sana-style
adaLN-single block with GLUMBConv feed-forward, and the final layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm
from torch import nn

from pipeline.models.attention import CrossAttention, LinearSelfAttention, RopeTables


class PatchEmbed(nn.Module):
    """[B, C, 16, T] latent → [B, T, dim] tokens: one token per latent frame.

    Conv (16×1, stride 16×1) to C·256 channels, GroupNorm(32), 1×1 conv to the model width.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int] = (16, 1)):
        super().__init__()
        hidden = in_channels * 256
        self.early_conv_layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=tuple(patch_size), stride=tuple(patch_size), bias=True),
            nn.GroupNorm(num_groups=32, num_channels=hidden, eps=1e-6, affine=True),
            nn.Conv2d(hidden, dim, kernel_size=1, stride=1, bias=True),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.early_conv_layers(latent).flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """A Conv1d along time (named ``conv`` as in the checkpoint) with an optional SiLU, applied to
    time-major tokens [B, T, C] → [B, T, C_out] without transposing them: a 1×1 conv is a linear
    layer (a plain GEMM), a wider one runs as a channels-last conv2d over the same memory."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, groups: int = 1, bias: bool = True, act: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        self.act = nn.SiLU() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if hasattr(conv, "base_layer"):
            # a LoRA target (peft wraps the conv): its own forward adds the LoRA, on [B, C, T]
            x = conv(x.transpose(1, 2)).transpose(1, 2)
        elif conv.kernel_size[0] == 1 and conv.groups == 1:
            x = F.linear(x, conv.weight.squeeze(-1), conv.bias)
        else:
            # [B, T, C] memory is [B, C, 1, T] in channels-last layout: no copy on the way in or out
            x = F.conv2d(x.transpose(1, 2).unsqueeze(2), conv.weight.unsqueeze(2), conv.bias,
                         padding=(0, conv.padding[0]), groups=conv.groups).squeeze(2).transpose(1, 2)
        return self.act(x) if self.act is not None else x


class GLUMBConv(nn.Module):
    """Gated inverted-bottleneck conv FFN: 1×1 (+SiLU) → depthwise k3 along time → x·SiLU(gate) → 1×1.

    Not position-wise: the depthwise conv mixes neighbouring frames. Works on [B, T, C] throughout.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inverted_conv = ConvLayer(dim, hidden * 2, 1, act=True)
        self.depth_conv = ConvLayer(hidden * 2, hidden * 2, 3, groups=hidden * 2)
        self.glu_act = nn.SiLU()
        self.point_conv = ConvLayer(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=-1)
        return self.point_conv(x * self.glu_act(gate))


class LinearTransformerBlock(nn.Module):
    """One DiT block (spec §2.5).

    Modulation rows of ``scale_shift_table + temb``: shift/scale/gate for the self-attention, then
    shift/scale/gate for the FFN. The cross-attention path has no norm, no modulation and no gate.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.norm1 = RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = LinearSelfAttention(dim, heads, head_dim)
        self.cross_attn = CrossAttention(dim, heads, head_dim)
        self.norm2 = RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff = GLUMBConv(dim, int(dim * mlp_ratio))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        rope: RopeTables,
        rope_cross: RopeTables,
        temb: torch.Tensor,
    ) -> torch.Tensor:
        batch = hidden_states.shape[0]
        modulation = self.scale_shift_table[None] + temb.reshape(batch, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)

        h = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        hidden_states = hidden_states + gate_msa * self.attn(h, attention_mask, rope)

        hidden_states = hidden_states + self.cross_attn(
            hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, rope, rope_cross
        )

        h = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        return hidden_states + gate_mlp * self.ff(h)


class FinalLayer(nn.Module):
    """RMSNorm, modulation by the 2560-d timestep embedding (not t_block), linear, unpatchify."""

    def __init__(self, dim: int, patch_size: tuple[int, int], out_channels: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.norm_final = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch_size[0] * patch_size[1] * out_channels, bias=True)
        self.patch_size = tuple(patch_size)
        self.out_channels = out_channels

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # [B, W, ph·pw·C] → [B, C, ph, W·pw]; output[b, c, p, w] = x[b, w, p·pw·C + q·C + c].
        ph, pw = self.patch_size
        b, w, _ = x.shape
        x = x.reshape(b, w, ph, pw, self.out_channels)
        return x.permute(0, 4, 2, 1, 3).reshape(b, self.out_channels, ph, w * pw)

    def forward(self, x: torch.Tensor, embedded_timestep: torch.Tensor, output_length: int) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        x = self.norm_final(x) * (1 + scale) + shift
        x = self.unpatchify(self.linear(x))
        width = x.shape[-1]
        if width > output_length:
            x = x[..., :output_length]
        elif width < output_length:
            x = nn.functional.pad(x, (0, output_length - width))
        return x
