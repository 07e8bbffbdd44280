"""Benchmark checkpoints with RANDOM weights: "small" (every width ÷ 8) and "full" (the real sizes).

`aceturbo bench` needs models whose *compute* looks like the real ones, not whose outputs mean
anything. Two sizes besides the tiny demo checkpoint (pipeline/tiny/demo.py):

- ``full``: the released configurations (transformer spec §1.1 = acestep-v1-transformer-config.json,
  DCAE §1.2, vocoder §1.3, UMT5-base §1.4, a MERT-v1-330M-like HuBERT of 24 layers × 1024 and an
  mHuBERT-147-like HuBERT-base). The values are written out here because ../shared is not beside a
  user's checkout. Nothing is downloaded: every weight is drawn at random.
- ``small``: the same depths, every width (hidden sizes, conv channels, FFN sizes, head dims) ÷ 8,
  so every matmul and convolution costs ~1/64 of the real one in each model and the ratio of
  encoder work (per song) to transformer work (per step) stays close to the real ratio; pipeline/
  bench.py measures that ratio with a FLOP counter and the docs quote it.

The folders use the real layouts (``ace_step_transformer/``, ``music_dcae_f8c8/``,
``music_vocoder/``, ``umt5-base/``, a MERT remote-code folder, a HuBERT folder) so they load through
exactly the code the real checkpoints go through.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from pipeline.config import ModelsConfig

if TYPE_CHECKING:  # torch is imported where weights are made: configs() is read by torch-free callers
    import torch

SIZES = ("small", "full")
WIDTH_DIVISOR = 8  # small = full with every width divided by this
SHARD_BYTES = 2 << 30  # the random transformer is written in files of at most this size

LABEL = ("RANDOM WEIGHTS - benchmark checkpoint written by `aceturbo bench` ({size}). It measures speed\n"
         "and memory only; its outputs are noise.\n")

# spec §1.1 (== /work/shared/spec/acestep-v1-transformer-config.json, embedded: ../shared is absent for users)
FULL_TRANSFORMER_CONFIG = dict(
    in_channels=8, num_layers=24, inner_dim=2560, attention_head_dim=128, num_attention_heads=20,
    mlp_ratio=2.5, out_channels=8, max_position=32768, rope_theta=1000000.0, speaker_embedding_dim=512,
    text_embedding_dim=768, ssl_encoder_depths=[8, 8], ssl_names=["mert", "m-hubert"],
    ssl_latent_dims=[1024, 768], patch_size=[16, 1], max_height=16, max_width=32768,
    lyric_encoder_vocab_size=6693, lyric_hidden_size=1024,
)

# spec §1.2
FULL_DCAE_CONFIG = dict(
    in_channels=2, latent_channels=8, attention_head_dim=32,
    encoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(128, 256, 512, 1024), decoder_block_out_channels=(128, 256, 512, 1024),
    encoder_layers_per_block=(2, 2, 3, 3), decoder_layers_per_block=(3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)

# spec §1.3
FULL_VOCODER_CONFIG = dict(
    input_channels=128, depths=[3, 3, 9, 3], dims=[128, 256, 384, 512], drop_path_rate=0.0, kernel_sizes=[7],
    upsample_rates=[4, 4, 2, 2, 2, 2, 2], upsample_kernel_sizes=[8, 8, 4, 4, 4, 4, 4],
    resblock_kernel_sizes=[3, 7, 11, 13], resblock_dilation_sizes=[[1, 3, 5]] * 4, num_mels=512,
    upsample_initial_channel=1024, use_template=False, pre_conv_kernel_size=13, post_conv_kernel_size=13,
    sampling_rate=44100, n_fft=2048, win_length=2048, hop_length=512, f_min=40, f_max=16000, n_mels=128,
)

# HuBERT geometry shared by both SSL models: 320 samples per frame (spec §5)
_CONV = dict(conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2), num_conv_pos_embeddings=128,
             num_conv_pos_embedding_groups=16, vocab_size=32)
# MERT-v1-330M-like: 24 layers × 1024, pre-norm ("stable") layer norm, layer-normed conv front end.
FULL_MERT_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        conv_dim=(512,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
                        conv_bias=True, feat_proj_layer_norm=True, conv_pos_batch_norm=False, **_CONV)
# mHuBERT-147 = HuBERT-base: 12 layers × 768.
FULL_MHUBERT_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           conv_dim=(512,) * 7, feat_extract_norm="group", do_stable_layer_norm=False,
                           conv_bias=False, feat_proj_layer_norm=True, **_CONV)
# spec §1.4: google/umt5-base encoder
FULL_UMT5_CONFIG = dict(d_model=768, num_layers=12, num_heads=12, d_kv=64, d_ff=2048, vocab_size=256384)


def _div(value: int, k: int = WIDTH_DIVISOR) -> int:
    return max(1, int(value) // k)


def configs(size: str) -> dict[str, dict]:
    """Every part's constructor arguments for ``size`` ("small" or "full")."""
    if size == "full":
        return {"transformer": dict(FULL_TRANSFORMER_CONFIG), "dcae": dict(FULL_DCAE_CONFIG),
                "vocoder": dict(FULL_VOCODER_CONFIG), "mert": dict(FULL_MERT_CONFIG),
                "mhubert": dict(FULL_MHUBERT_CONFIG), "umt5": dict(FULL_UMT5_CONFIG)}
    if size != "small":
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    k = WIDTH_DIVISOR
    full = configs("full")
    t = full["transformer"]
    heads, head_dim = 10, _div(t["num_attention_heads"] * t["attention_head_dim"]) // 10  # 2560/8 = 320 = 10 × 32
    mert_dim, mhubert_dim, text_dim = _div(1024), _div(768), _div(768)
    t.update(num_attention_heads=heads, attention_head_dim=head_dim, inner_dim=heads * head_dim,
             text_embedding_dim=text_dim, ssl_latent_dims=[mert_dim, mhubert_dim],
             lyric_hidden_size=_div(1024), lyric_encoder_output_size=_div(1024),
             lyric_encoder_attention_heads=2, lyric_encoder_linear_units=_div(4096), lyric_encoder_num_blocks=6)
    d = full["dcae"]
    d.update(attention_head_dim=_div(32),
             encoder_block_out_channels=tuple(_div(c) for c in d["encoder_block_out_channels"]),
             decoder_block_out_channels=tuple(_div(c) for c in d["decoder_block_out_channels"]))
    v = full["vocoder"]
    v.update(dims=[_div(c) for c in v["dims"]], num_mels=_div(v["num_mels"]),
             upsample_initial_channel=_div(v["upsample_initial_channel"]))
    for name, hidden in (("mert", mert_dim), ("mhubert", mhubert_dim)):
        c = full[name]
        c.update(hidden_size=hidden, intermediate_size=_div(c["intermediate_size"]),
                 conv_dim=tuple(_div(x) for x in c["conv_dim"]))
    u = full["umt5"]
    u.update(d_model=text_dim, d_kv=_div(u["d_kv"]), d_ff=_div(u["d_ff"]), vocab_size=None)
    assert heads * head_dim * k == 2560
    return full


def models_config(root: str | Path, size: str) -> ModelsConfig:
    root = Path(root)
    return ModelsConfig(acestep=str(root / f"ACE-Step-v1-{size}"), mert=str(root / f"MERT-{size}"),
                        mhubert=str(root / f"mHuBERT-{size}"), lyric_vocab=str(root / "lyrics_vocab.json"))


# ------------------------------------------------------------------ writers
def random_tensors(model: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, random tensor) for every entry of ``model``'s state dict, in order (the model may live on
    ``meta``): kernels ~ N(0, 1/fan_in) (unit-variance outputs), biases ~ 0.02·N(0,1), 1-d scales ~
    1 + 0.02·N."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, p in model.state_dict().items():
        if p.ndim >= 2:
            t = torch.randn(p.shape, generator=generator) * (1.0 / max(1, p[0].numel()) ** 0.5)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(p.shape, generator=generator)
        else:
            t = 1.0 + 0.02 * torch.randn(p.shape, generator=generator)
        yield name, t.to(dtype).contiguous()


def save_transformer(folder: str | Path, config: dict, dtype: torch.dtype | None = None, seed: int = 0) -> Path:
    """``ace_step_transformer/`` with random weights (bf16 by default, as released), built on ``meta``
    and written in shards of at most SHARD_BYTES with diffusers' index file, so that only one shard's
    tensors are ever in memory (the full size: 4 files, ~4 GB peak instead of the whole 6.6 GB state
    dict plus the writer's copy of it)."""
    import torch
    from safetensors.torch import save_file

    from pipeline.models.transformer import WEIGHTS_NAME, ACEStepTransformer2DModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = dtype or torch.bfloat16
    with torch.device("meta"):
        model = ACEStepTransformer2DModel(**config)
    model.save_config(folder)
    shards: list[list[str]] = [[]]
    used = 0
    for name, p in model.state_dict().items():
        size = p.numel() * dtype.itemsize
        if shards[-1] and used + size > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    tensors = random_tensors(model, dtype, seed)
    if len(shards) == 1:
        save_file(dict(tensors), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return folder
    stem = WEIGHTS_NAME.removesuffix(".safetensors")
    weight_map = {}
    for number, names in enumerate(shards, 1):
        file = f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(itertools.islice(tensors, len(names))), str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(p.numel() for p in model.state_dict().values()) * dtype.itemsize
    (folder / (WEIGHTS_NAME + ".index.json")).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8")
    return folder


def save_codec(root: str | Path, dcae_config: dict, vocoder_config: dict, seed: int = 0) -> None:
    """``music_dcae_f8c8/`` and ``music_vocoder/`` (default random init; the vocoder's mel buffers real)."""
    import torch
    from diffusers import AutoencoderDC

    from pipeline.models.codec import DCAE_FOLDER, VOCODER_FOLDER
    from pipeline.models.vocoder import ADaMoSHiFiGANV1

    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dcae = AutoencoderDC(**dcae_config)
        dcae.save_pretrained(root / DCAE_FOLDER, safe_serialization=True)
        del dcae
        vocoder = ADaMoSHiFiGANV1(**vocoder_config)
        vocoder.save_pretrained(root / VOCODER_FOLDER, safe_serialization=True)


def save_hubert(folder: str | Path, config: dict, seed: int = 0, mert: bool = False) -> Path:
    """A HuBERT folder (mHuBERT-147 layout) or, with ``mert``, a MERT-v1 remote-code folder."""
    from transformers import HubertConfig

    from pipeline.tiny.ssl import MERT_CONFIGURATION_SOURCE, MERT_MODELING_SOURCE, _save_random_hubert

    folder = Path(folder)
    data = _save_random_hubert(folder, HubertConfig(**config), seed)
    if mert:  # the same rewrite as pipeline.tiny.ssl.save_tiny_mert
        data.update(model_type="mert_model", architectures=["MERTModel"],
                    auto_map={"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
                    feature_extractor_cqt=False, feature_extractor_cqt_bins=336, deepnorm=False,
                    attention_relax=-1.0, sample_rate=24000)
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (folder / "configuration_MERT.py").write_text(MERT_CONFIGURATION_SOURCE, encoding="utf-8")
        (folder / "modeling_MERT.py").write_text(MERT_MODELING_SOURCE, encoding="utf-8")
    return folder


def build_bench_checkpoint(root: str | Path, size: str, lyrics_corpus: list[str], seed: int = 0,
                           dtype: torch.dtype | None = None) -> ModelsConfig:
    """Write every part for ``size`` under ``root`` (skipped when already complete); return the
    params.yaml ``models:`` section pointing at it. ``dtype``: the transformer file's dtype (default
    bf16, as the released file: training in fp32 converts it while loading, as with the real one)."""
    from pipeline.tiny.text import save_demo_lyric_vocab, save_tiny_umt5

    root = Path(root)
    models = models_config(root, size)
    done = root / f"COMPLETE-{size}"
    if done.exists():
        return models
    parts = configs(size)
    root.mkdir(parents=True, exist_ok=True)
    (root / "README-RANDOM-WEIGHTS.txt").write_text(LABEL.format(size=size), encoding="utf-8")
    acestep = Path(models.acestep)
    vocab_size = save_demo_lyric_vocab(Path(models.lyric_vocab), lyrics_corpus)
    transformer = dict(parts["transformer"])
    transformer["lyric_encoder_vocab_size"] = max(vocab_size, transformer["lyric_encoder_vocab_size"])
    save_transformer(acestep / "ace_step_transformer", transformer, dtype=dtype, seed=seed)
    save_codec(acestep, parts["dcae"], parts["vocoder"], seed=seed)
    save_tiny_umt5(acestep / "umt5-base", seed=seed, **parts["umt5"])
    save_hubert(Path(models.mert), parts["mert"], seed=seed, mert=True)
    save_hubert(Path(models.mhubert), parts["mhubert"], seed=seed)
    done.write_text("ok\n", encoding="utf-8")
    return models
