"""The UMT5 text encoder, loaded from a tiny random folder in the released layout."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.models.text_encoder import MAX_TEXT_TOKENS, UMT5TextEncoder
from pipeline.tiny.text import save_tiny_umt5


@pytest.fixture(scope="module")
def umt5_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("acestep")
    save_tiny_umt5(root / "umt5-base", seed=0, d_model=12)
    return root


@pytest.fixture(scope="module")
def encoder(umt5_root):
    return UMT5TextEncoder.from_folder(umt5_root / "umt5-base")


def test_folder_has_the_released_files(umt5_root):
    names = {p.name for p in (umt5_root / "umt5-base").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    config = json.loads((umt5_root / "umt5-base" / "config.json").read_text())
    assert config["d_model"] == 12 and config["model_type"] == "umt5"


def test_encode_shapes_mask_and_padding(encoder):
    prompts = ["pop", "dreamy synthwave, female vocals, piano, slow tempo"]
    states, mask = encoder.encode(prompts)
    assert states.dtype == torch.float32 and mask.dtype == torch.long
    assert states.shape[:2] == mask.shape and states.shape[0] == 2 and states.shape[2] == 12
    lengths = mask.sum(1)
    # Padded to the longest prompt only; </s> counted in the mask.
    assert int(lengths.max()) == mask.shape[1] and int(lengths[0]) < int(lengths[1])
    single, single_mask = encoder.encode(["pop"])
    assert single_mask.shape[1] == int(lengths[0]) and int(single_mask.sum()) == int(lengths[0])
    ids = encoder.tokenize(["pop"])["input_ids"][0]
    assert int(ids[-1]) == encoder.tokenizer.convert_tokens_to_ids("</s>")
    # Padding does not change the valid positions (the mask hides the pads).
    n = int(lengths[0])
    assert torch.allclose(states[0, :n], single[0], atol=1e-5)
    assert not states.requires_grad


def test_truncation_at_256_tokens(encoder):
    long_prompt = ", ".join(["pop rock jazz"] * 200)
    states, mask = encoder.encode([long_prompt, "pop"])
    assert mask.shape[1] == MAX_TEXT_TOKENS == 256 and states.shape[1] == 256
    assert int(mask[0].sum()) == 256


def test_frozen_eval_and_placement(encoder):
    assert not encoder.model.training
    assert all(not p.requires_grad for p in encoder.model.parameters())
    assert encoder.to("cpu", torch.bfloat16) is encoder and encoder.dtype == torch.bfloat16
    states, _ = encoder.encode(["pop"])
    assert states.dtype == torch.bfloat16
    encoder.to(dtype=torch.float32)
    assert encoder.offload().device.type == "cpu" and encoder.dtype == torch.float32


def test_checkpoint_root_is_accepted(umt5_root):
    enc = UMT5TextEncoder.from_folder(umt5_root, dtype=torch.float32, device="cpu")
    assert enc.hidden_size == 12


def test_missing_folder_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"UMT5 text encoder .* not found at .*umt5-base.*ACE-Step/ACE-Step-v1-3.5B"):
        UMT5TextEncoder.from_folder(tmp_path / "umt5-base")
    (tmp_path / "umt5-base").mkdir()
    (tmp_path / "umt5-base" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"incomplete: missing model\.safetensors"):
        UMT5TextEncoder.from_folder(tmp_path / "umt5-base")


def test_erg_null_without_blocks_8_9_equals_plain(encoder):
    assert encoder.num_blocks < 9
    a, ma = encoder.encode(["pop, piano"])
    b, mb = encoder.erg_null_encode(["pop, piano"])
    assert torch.equal(a, b) and torch.equal(ma, mb)


def test_erg_null_scales_queries_of_blocks_8_and_9(tmp_path):
    save_tiny_umt5(tmp_path / "umt5-base", seed=1, num_layers=10)
    enc = UMT5TextEncoder.from_folder(tmp_path / "umt5-base")
    calls = []
    q8 = enc.model.encoder.block[8].layer[0].SelfAttention.q
    q7 = enc.model.encoder.block[7].layer[0].SelfAttention.q
    h8 = q8.register_forward_hook(lambda m, i, o: calls.append(("q8", o.abs().sum().item())))
    plain, _ = enc.encode(["pop, piano"])
    null, _ = enc.erg_null_encode(["pop, piano"])
    h8.remove()
    assert not torch.allclose(plain, null)
    # Hooks are removed afterwards: encoding is plain again.
    again, _ = enc.encode(["pop, piano"])
    assert torch.equal(plain, again)
    assert len(q8._forward_hooks) == 0 and len(q7._forward_hooks) == 0
    # Check the scale by hand: the hooked q output of block 8 is 0.01 × the plain one.
    captured = {}
    h = q8.register_forward_hook(lambda m, i, o: captured.setdefault("plain", o.clone()))
    enc.encode(["pop"])
    h.remove()
    with enc._erg_hooks() as n_hooks:
        h = q8.register_forward_hook(lambda m, i, o: captured.setdefault("erg", o.clone()))
        enc.encode(["pop"])
        h.remove()
    assert n_hooks == 2
    # Our probe hook runs after the ERG hook, so it sees the scaled output.
    assert torch.allclose(captured["erg"], captured["plain"] * 0.01, atol=1e-7)
