"""ACE-Step's mel vocoder ``ADaMoSHiFiGANV1`` (spec §1.3, §3.4): 128-bin log-mel at 44.1 kHz in,
mono waveform out (512 samples per mel frame).

Two parts: a 1-D ConvNeXt ``backbone`` that turns mels into ``num_mels`` features per frame, and a
HiFi-GAN ``head`` that upsamples those features 512× into samples. ``mel_transform`` is the
matching front end (``pipeline.models.mel``). Parameter names follow the released
``music_vocoder/diffusion_pytorch_model.safetensors``, so the folder loads with diffusers'
``from_pretrained`` and saves back to the same keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pipeline.models.mel import LogMelSpectrogram


# --------------------------------------------------------------------------------------------
# Weight-normalised convolutions.
#
# The checkpoint stores every head convolution as (weight_g, weight_v, bias), the layout of the
# legacy ``torch.nn.utils.weight_norm``. These small classes own exactly those parameters and build
# the weight on the fly (w = g · v / ‖v‖, norm over all dims but 0), so the state-dict keys are the
# checkpoint's for both loading and saving, without the deprecated hook-based API or the renamed
# keys of the parametrization API.
# --------------------------------------------------------------------------------------------


def _weight_from_g_v(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # The norm is taken in fp32 even for bf16 weights: a bf16 sum of squares over a whole
    # 1024×1024×13 kernel loses enough precision to shift the weight's magnitude.
    v32 = v.float()
    norm = v32.norm(dim=tuple(range(1, v.dim())), keepdim=True)
    return (v32 * (g.float() / norm)).to(v.dtype)


class _WeightNorm:
    """Replaces a conv's ``weight`` parameter by ``weight_g`` (magnitude) and ``weight_v``."""

    def _split_weight(self) -> None:
        weight = self.weight
        del self.weight  # type: ignore[attr-defined]
        with torch.no_grad():
            g = weight.norm(dim=tuple(range(1, weight.dim())), keepdim=True)
        self.weight_g = nn.Parameter(g)
        self.weight_v = nn.Parameter(weight.detach().clone())

    def normalised_weight(self) -> torch.Tensor:
        return _weight_from_g_v(self.weight_g, self.weight_v)


class WNConv1d(_WeightNorm, nn.Conv1d):
    """``nn.Conv1d`` with a weight-normalised kernel (keys ``weight_g``, ``weight_v``, ``bias``)."""

    def __init__(self, *args, **kwargs):
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._split_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalised_weight(), self.bias)


class WNConvTranspose1d(_WeightNorm, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with a weight-normalised kernel (norm over dim 0, as the checkpoint)."""

    def __init__(self, *args, **kwargs):
        nn.ConvTranspose1d.__init__(self, *args, **kwargs)
        self._split_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(
            x,
            self.normalised_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.output_padding,
            self.groups,
            self.dilation,
        )


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Padding that keeps the length of a stride-1 convolution."""
    return (kernel_size * dilation - dilation) // 2


# --------------------------------------------------------------------------------------------
# Backbone: ConvNeXt over time.
# --------------------------------------------------------------------------------------------


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of [B, C, T] (parameters ``weight``/``bias`` of size C)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None] * x + self.bias[:, None]


class ConvNeXtBlock(nn.Module):
    """Depthwise conv → LayerNorm → MLP (×4, GELU) → per-channel ``gamma`` → residual."""

    def __init__(self, dim: int, kernel_size: int = 7, layer_scale_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=same_padding(kernel_size), groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.dwconv(x).transpose(1, 2)  # [B, T, C]: the MLP runs per frame
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).transpose(1, 2)
        return residual + x


class ConvNeXtEncoder(nn.Module):
    """Stem + 4 stages; ``channel_layers[i]`` changes the width before ``stages[i]``."""

    def __init__(self, input_channels: int, depths: list[int], dims: list[int], kernel_size: int = 7):
        super().__init__()
        self.channel_layers = nn.ModuleList()
        self.channel_layers.append(
            nn.Sequential(
                # Replicate padding: the stem must not invent a silent border around the mel.
                nn.Conv1d(input_channels, dims[0], 7, padding=3, padding_mode="replicate"),
                ChannelsFirstLayerNorm(dims[0]),
            )
        )
        for i in range(1, len(dims)):
            self.channel_layers.append(
                nn.Sequential(ChannelsFirstLayerNorm(dims[i - 1]), nn.Conv1d(dims[i - 1], dims[i], 1))
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*[ConvNeXtBlock(dims[i], kernel_size) for _ in range(depths[i])])
            for i in range(len(dims))
        )
        self.norm = ChannelsFirstLayerNorm(dims[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for channel_layer, stage in zip(self.channel_layers, self.stages):
            x = stage(channel_layer(x))
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# Head: HiFi-GAN generator.
# --------------------------------------------------------------------------------------------


class ResBlock1(nn.Module):
    """Three (dilated conv, plain conv) pairs, each with SiLU pre-activations and a residual."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, padding=same_padding(kernel_size))
            for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = x + conv2(F.silu(conv1(F.silu(x))))
        return x


class HiFiGANGenerator(nn.Module):
    """``conv_pre`` → per stage [SiLU, transposed conv, mean of the stage's ResBlocks] →
    SiLU → ``conv_post`` → tanh. Each stage halves the width; the strides multiply to the hop."""

    def __init__(
        self,
        num_mels: int,
        upsample_initial_channel: int,
        upsample_rates: list[int],
        upsample_kernel_sizes: list[int],
        resblock_kernel_sizes: list[int],
        resblock_dilation_sizes: list[list[int]],
        pre_conv_kernel_size: int = 13,
        post_conv_kernel_size: int = 13,
    ):
        super().__init__()
        self.num_kernels = len(resblock_kernel_sizes)
        self.conv_pre = WNConv1d(
            num_mels, upsample_initial_channel, pre_conv_kernel_size,
            padding=same_padding(pre_conv_kernel_size),
        )
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        channels = upsample_initial_channel
        for rate, kernel in zip(upsample_rates, upsample_kernel_sizes):
            self.ups.append(
                WNConvTranspose1d(channels, channels // 2, kernel, rate, padding=(kernel - rate) // 2)
            )
            channels //= 2
            for k, dilations in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(channels, k, dilations))
        self.conv_post = WNConv1d(
            channels, 1, post_conv_kernel_size, padding=same_padding(post_conv_kernel_size)
        )
        # HiFi-GAN's noise-injection branch is configured off in ACE-Step: nothing to hold.
        self.noise_convs = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.silu(x))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / self.num_kernels
        x = self.conv_post(F.silu(x))
        return torch.tanh(x)


class ADaMoSHiFiGANV1(ModelMixin, ConfigMixin):
    """The released ACE-Step vocoder. ``decode(mel [B,128,T]) -> wav [B,1,T·hop]``."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        input_channels: int = 128,
        depths: list[int] = (3, 3, 9, 3),
        dims: list[int] = (128, 256, 384, 512),
        drop_path_rate: float = 0.0,
        kernel_sizes: list[int] = (7,),
        upsample_rates: list[int] = (4, 4, 2, 2, 2, 2, 2),
        upsample_kernel_sizes: list[int] = (8, 8, 4, 4, 4, 4, 4),
        resblock_kernel_sizes: list[int] = (3, 7, 11, 13),
        resblock_dilation_sizes: list[list[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5), (1, 3, 5)),
        num_mels: int = 512,
        upsample_initial_channel: int = 1024,
        use_template: bool = False,
        pre_conv_kernel_size: int = 13,
        post_conv_kernel_size: int = 13,
        sampling_rate: int = 44100,
        n_fft: int = 2048,
        win_length: int = 2048,
        hop_length: int = 512,
        f_min: int = 40,
        f_max: int = 16000,
        n_mels: int = 128,
    ):
        super().__init__()
        if use_template:
            raise ValueError("ADaMoSHiFiGANV1: use_template=True is not used by ACE-Step and not supported")
        if drop_path_rate:
            # Stochastic depth only matters when training the vocoder, which this project never does.
            raise ValueError("ADaMoSHiFiGANV1: drop_path_rate must be 0 (inference-only vocoder)")
        hop = 1
        for rate in upsample_rates:
            hop *= rate
        if hop != hop_length:
            raise ValueError(f"upsample_rates multiply to {hop}, but hop_length is {hop_length}")
        self.backbone = ConvNeXtEncoder(input_channels, list(depths), list(dims), kernel_sizes[0])
        self.head = HiFiGANGenerator(
            num_mels=num_mels,
            upsample_initial_channel=upsample_initial_channel,
            upsample_rates=list(upsample_rates),
            upsample_kernel_sizes=list(upsample_kernel_sizes),
            resblock_kernel_sizes=list(resblock_kernel_sizes),
            resblock_dilation_sizes=[list(d) for d in resblock_dilation_sizes],
            pre_conv_kernel_size=pre_conv_kernel_size,
            post_conv_kernel_size=post_conv_kernel_size,
        )
        self.mel_transform = LogMelSpectrogram(
            sample_rate=sampling_rate,
            n_fft=n_fft,
            win_length=win_length,
            hop_length=hop_length,
            n_mels=n_mels,
            f_min=f_min,
            f_max=f_max,
        )

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio`` [..., N] at ``sampling_rate`` -> log-mel [..., n_mels, N/hop]."""
        return self.mel_transform(audio)

    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, n_mels, T] -> waveform [B, 1, T·hop] in [-1, 1]."""
        return self.head(self.backbone(mel))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.decode(mel)
