"""The full-size model's parameter names and shapes equal the released checkpoint's (spec keys tsv)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.models.transformer import ACEStepTransformer2DModel


def _read_keys(path):
    keys = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape = line.split("\t")
        keys.append((name, tuple(int(n) for n in shape.split("x"))))
    return keys


def _released_config(spec):
    config = json.loads((spec / "acestep-v1-transformer-config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_full_size_state_dict_matches_released_keys(spec):
    expected = _read_keys(spec / "keys" / "ace_step_transformer.tsv")
    start = time.perf_counter()
    with torch.device("meta"):
        model = ACEStepTransformer2DModel(**_released_config(spec))
    build_s = time.perf_counter() - start
    got = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]

    missing = sorted({n for n, _ in expected} - {n for n, _ in got})
    unexpected = sorted({n for n, _ in got} - {n for n, _ in expected})
    assert not missing, f"missing keys: {missing[:10]}"
    assert not unexpected, f"unexpected keys: {unexpected[:10]}"
    shapes = dict(got)
    wrong = [(n, shapes[n], s) for n, s in expected if shapes[n] != s]
    assert not wrong, f"wrong shapes (name, ours, released): {wrong[:10]}"
    assert [n for n, _ in got] == [n for n, _ in expected], "state-dict order differs from the checkpoint"

    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 3_305_659_264  # spec §1: the size of the released file / 2 bytes
    assert build_s < 10, f"meta build took {build_s:.1f}s"


def test_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="ACE-Step"):
        ACEStepTransformer2DModel.from_pretrained(tmp_path / "nope" / "ace_step_transformer")
    (tmp_path / "ace_step_transformer").mkdir()
    (tmp_path / "ace_step_transformer" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        ACEStepTransformer2DModel.from_pretrained(tmp_path / "ace_step_transformer")
