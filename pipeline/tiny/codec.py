"""Tiny ``music_dcae_f8c8/`` and ``music_vocoder/`` folders with RANDOM weights.

Same file format and config keys as the released folders (and as the golden tiny ones), so the demo
and the tests go through exactly the loading code used for the real codec
(``MusicDCAE.from_checkpoint``). Only widths and depths are small; the time/frequency geometry
(128 mel bins, hop 512, 8× DCAE compression, 8 latent channels) is the real one, so every shape
downstream is the real shape.

The weights are re-drawn so that nothing is degenerate: the ConvNeXt layer scales start at 1e-6 in
a fresh model (blocks would be near-identities), zero biases would hide wiring mistakes, and the
vocoder head gets gains that let its output follow its input.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderDC

from pipeline.models.codec import DCAE_FOLDER, VOCODER_FOLDER
from pipeline.models.vocoder import ADaMoSHiFiGANV1, WNConv1d, WNConvTranspose1d

# Mirrors golden/acestep_tiny/music_dcae_f8c8/config.json: 4 stages (8× compression), tiny widths.
TINY_DCAE_CONFIG = dict(
    in_channels=2,
    latent_channels=8,
    attention_head_dim=4,
    encoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 16, 16),
    decoder_block_out_channels=(8, 16, 16, 16),
    encoder_layers_per_block=(1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1),
    encoder_qkv_multiscales=((), (), (), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,)),
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=1.0,
)

# Mirrors golden/acestep_tiny/music_vocoder/config.json: real hop (512) and mel settings.
TINY_VOCODER_CONFIG = dict(
    input_channels=128,
    depths=[1, 1, 1, 1],
    dims=[8, 8, 16, 16],
    drop_path_rate=0.0,
    kernel_sizes=[7],
    upsample_rates=[4, 4, 2, 2, 2, 2, 2],
    upsample_kernel_sizes=[8, 8, 4, 4, 4, 4, 4],
    resblock_kernel_sizes=[3, 7],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
    num_mels=16,
    upsample_initial_channel=128,
    use_template=False,
    pre_conv_kernel_size=13,
    post_conv_kernel_size=13,
    sampling_rate=44100,
    n_fft=2048,
    win_length=2048,
    hop_length=512,
    f_min=40,
    f_max=16000,
    n_mels=128,
)


def _redraw(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Perturb every parameter so none is constant (ones, zeros, 1e-6 layer scales)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":  # ConvNeXt layer scale: make the blocks do something
                param.copy_(0.02 + 0.03 * torch.rand(param.shape, generator=generator))
            elif leaf == "bias" or param.dim() == 1:  # biases and norm scales
                base = param.mean().item()  # 1 for norm scales, 0 for biases
                param.copy_(base + 0.03 * noise)
            elif leaf == "weight_g":  # set by _set_vocoder_gains
                continue
            else:  # kernels keep their fan-in scaled default init, plus a little noise
                param.add_(param.std().clamp_min(1e-3) * 0.1 * noise)


def _set_vocoder_gains(vocoder: ADaMoSHiFiGANV1, generator: torch.Generator) -> None:
    """Give the HiFi-GAN head gains near 1 so its output depends on the mel.

    With PyTorch's default init each of the head's ~40 convolutions shrinks the signal, and the
    output becomes a fixed pattern driven by the biases, whatever the input (the golden tiny
    vocoder behaves so). A weight-norm magnitude g ≈ 1.1 per output channel keeps the variance
    roughly constant through a conv (√(stride/2) for the transposed ones, which spread each input
    over stride outputs); much above that the stack turns chaotic and saturates the tanh.
    """
    gain = 1.1
    with torch.no_grad():
        for module in vocoder.head.modules():
            if isinstance(module, (WNConv1d, WNConvTranspose1d)):
                g = gain * math.sqrt(module.stride[0] / 2) if isinstance(module, WNConvTranspose1d) else gain
                jitter = 1 + 0.05 * torch.randn(module.weight_g.shape, generator=generator)
                module.weight_g.copy_(g * jitter)
                module.bias.copy_(0.01 * torch.randn(module.bias.shape, generator=generator))


def save_tiny_codec(root: str | Path, seed: int = 0) -> None:
    """Write ``<root>/music_dcae_f8c8/`` and ``<root>/music_vocoder/`` (config.json +
    diffusion_pytorch_model.safetensors each) with seeded random weights."""
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    # Model constructors draw their default init from the global RNG: seed it without leaking.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dcae = AutoencoderDC(**TINY_DCAE_CONFIG)
        vocoder = ADaMoSHiFiGANV1(**TINY_VOCODER_CONFIG)
    _redraw(dcae, generator)
    _redraw(vocoder, generator)
    _set_vocoder_gains(vocoder, generator)
    dcae.save_pretrained(root / DCAE_FOLDER, safe_serialization=True)
    vocoder.save_pretrained(root / VOCODER_FOLDER, safe_serialization=True)
