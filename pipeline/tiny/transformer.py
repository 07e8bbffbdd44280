"""A tiny ``ace_step_transformer/`` folder with RANDOM weights (demo and tests).

Same file format and config keys as the released folder (and the golden tiny one), so everything
goes through the real ``ACEStepTransformer2DModel.from_pretrained``. Only widths/depths are small;
the latent geometry (8 channels × 16 rows, one token per frame) is the real one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

# Mirrors golden/acestep_tiny/ace_step_transformer/config.json.
TINY_TRANSFORMER_CONFIG = dict(
    in_channels=8,
    num_layers=2,
    inner_dim=32,
    attention_head_dim=16,
    num_attention_heads=2,
    mlp_ratio=2.5,
    out_channels=8,
    max_position=4096,
    rope_theta=1000000.0,
    ssl_encoder_depths=[0, 1],
    ssl_names=["mert", "m-hubert"],
    lyric_hidden_size=32,
    patch_size=[16, 1],
    max_height=16,
    max_width=4096,
    lyric_encoder_output_size=32,
    lyric_encoder_attention_heads=4,
    lyric_encoder_linear_units=48,
    lyric_encoder_num_blocks=2,
)


def _redraw(model: torch.nn.Module, generator: torch.Generator) -> None:
    # Default inits leave biases and norm shifts at 0 and norm scales at 1; redraw every tensor
    # (small noise around a sensible scale) so no wiring mistake hides behind a zero or a one.
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                if isinstance(module, norms) and name == "weight":
                    p.copy_(1.0 + 0.1 * noise)
                elif p.ndim == 1:
                    p.copy_(0.05 * noise)  # biases, norm shifts
                else:
                    p.copy_(noise / max(1, p[0].numel()) ** 0.5)  # ~unit-variance outputs


def save_tiny_transformer(
    folder: str | Path,
    seed: int = 0,
    text_embedding_dim: int = 12,
    ssl_latent_dims: tuple[int, int] = (24, 20),
    lyric_vocab_size: int = 40,
    speaker_embedding_dim: int = 8,
    **overrides,
) -> Path:
    """Write a random tiny ACEStepTransformer2DModel (config.json + safetensors) to ``folder``."""
    from pipeline.models.transformer import ACEStepTransformer2DModel

    config = dict(TINY_TRANSFORMER_CONFIG)
    config.update(
        text_embedding_dim=text_embedding_dim,
        ssl_latent_dims=list(ssl_latent_dims),
        lyric_encoder_vocab_size=lyric_vocab_size,
        speaker_embedding_dim=speaker_embedding_dim,
    )
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ACEStepTransformer2DModel(**config)
    _redraw(model, torch.Generator().manual_seed(seed))

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then move the files in: a crash never leaves a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        folder.mkdir(exist_ok=True)
        for file in tmp.iterdir():
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
