"""Tiny MERT and mHuBERT folders with RANDOM weights, in the released layouts.

They exist so the demo checkpoint and the tests exercise exactly the loading code used for the real
models (``pipeline.models.ssl``):

- ``save_tiny_mert``: the MERT-v1 remote-code format — config.json with ``model_type: mert_model``
  and an ``auto_map`` to ``configuration_MERT.py`` / ``modeling_MERT.py`` that sit in the folder,
  plus ``model.safetensors``. The code files are our own small stand-ins: a HubertConfig subclass
  carrying the MERT flags and a HubertModel subclass. They only support what they can compute
  exactly (no CQT branch, no DeepNorm), and say so when asked for more.
- ``save_tiny_mhubert``: a plain transformers HuBERT folder, like mHuBERT-147.

Both keep the real conv front end (kernels 10,3,3,3,3,2,2 / strides 5,2,2,2,2,2,2: 320 samples per
frame) so frame counts match the real models; only widths and depths are tiny.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)

# Written verbatim into the tiny MERT folder; transformers imports it with trust_remote_code=True.
MERT_CONFIGURATION_SOURCE = '''\
"""Configuration of a MERT-v1-style model (tiny stand-in written by aceturbo).

MERT-v1 is a HuBERT encoder plus a few switches. Only the setting in which it equals HuBERT is
supported here: no CQT feature branch, no DeepNorm. The other switches (projection layer norm,
batch-norm positional conv) exist in HubertConfig already.
"""
from transformers import HubertConfig


class MERTConfig(HubertConfig):
    model_type = "mert_model"

    def __init__(self, feature_extractor_cqt=False, feature_extractor_cqt_bins=336, deepnorm=False,
                 attention_relax=-1.0, sample_rate=24000, **kwargs):
        self.feature_extractor_cqt = feature_extractor_cqt
        self.feature_extractor_cqt_bins = feature_extractor_cqt_bins
        self.deepnorm = deepnorm
        self.attention_relax = attention_relax
        self.sample_rate = sample_rate
        super().__init__(**kwargs)
'''

MERT_MODELING_SOURCE = '''\
"""A MERT-v1-style encoder (tiny stand-in written by aceturbo): HuBERT with MERT's config class."""
from transformers import HubertModel

from .configuration_MERT import MERTConfig


class MERTModel(HubertModel):
    config_class = MERTConfig

    def __init__(self, config):
        # These branches change the maths; this stand-in does not implement them, so it refuses
        # rather than silently computing something else.
        if getattr(config, "feature_extractor_cqt", False) or getattr(config, "deepnorm", False):
            raise ValueError("this MERT stand-in supports feature_extractor_cqt=False, deepnorm=False only")
        super().__init__(config)
'''


def _hubert_config(hidden_size: int, **extra):
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        conv_dim=(16,) * len(CONV_KERNEL),
        conv_kernel=CONV_KERNEL,
        conv_stride=CONV_STRIDE,
        conv_bias=False,
        feat_extract_norm="group",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        vocab_size=32,
        **extra,
    )


def _save_random_hubert(folder: Path, config, seed: int) -> dict:
    """Build a seeded random HubertModel, save it with save_pretrained; return its config dict."""
    from transformers import HubertModel

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's RNG stream
        torch.manual_seed(seed)
        model = HubertModel(config)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def save_tiny_mert(folder: str | Path, seed: int = 0, hidden_size: int = 24) -> Path:
    """Write a tiny MERT-v1-style folder (remote-code format, random weights); return it."""
    folder = Path(folder)
    # The MERT flags (STACK pitfall 4): projection layer norm on, batch-norm positional conv off.
    config = _hubert_config(hidden_size, feat_proj_layer_norm=True, conv_pos_batch_norm=False)
    data = _save_random_hubert(folder, config, seed)
    data.update(
        model_type="mert_model",
        architectures=["MERTModel"],
        auto_map={"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
        feature_extractor_cqt=False,
        feature_extractor_cqt_bins=336,
        deepnorm=False,
        attention_relax=-1.0,
        sample_rate=24000,
    )
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "configuration_MERT.py").write_text(MERT_CONFIGURATION_SOURCE, encoding="utf-8")
    (folder / "modeling_MERT.py").write_text(MERT_MODELING_SOURCE, encoding="utf-8")
    return folder


def save_tiny_mhubert(folder: str | Path, seed: int = 0, hidden_size: int = 20) -> Path:
    """Write a tiny plain-HuBERT folder (mHuBERT-147 layout, random weights); return it."""
    folder = Path(folder)
    _save_random_hubert(folder, _hubert_config(hidden_size, feat_proj_layer_norm=True), seed)
    return folder
