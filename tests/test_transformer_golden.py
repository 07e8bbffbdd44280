"""The transformer reproduces the reference outputs on the golden tiny checkpoint (fp32, eval, CPU)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.lora import load_lora
from pipeline.models.transformer import ACEStepTransformer2DModel

TOL = 1e-5


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b|."""
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def golden_dir():
    # Module-scoped twin of conftest's `golden` fixture (that one is per test; the model is loaded once).
    shared = Path(os.environ.get("ACETURBO_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    path = shared / "golden" / "acestep_tiny"
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (../shared is only beside a developer checkout)")
    return path


@pytest.fixture(scope="module")
def model(golden_dir):
    return ACEStepTransformer2DModel.from_pretrained(golden_dir / "ace_step_transformer").eval()


@pytest.fixture(scope="module")
def inputs(golden_dir):
    return load_file(golden_dir / "transformer_inputs.safetensors")


@pytest.fixture(scope="module")
def outputs(golden_dir):
    return load_file(golden_dir / "transformer_outputs.safetensors")


def _ssl_lists(inputs):
    # The reference takes per-sample lists of [T_ssl, D]. The golden batches hold real features in
    # every row (no all-zero padding rows), so each sample uses the full stored length.
    return [[row for row in inputs["ssl_0"]], [row for row in inputs["ssl_1"]]]


def _forward(model, inputs, ssl=None):
    with torch.no_grad():
        return model(
            hidden_states=inputs["hidden_states"],
            attention_mask=inputs["attention_mask"],
            encoder_text_hidden_states=inputs["encoder_text_hidden_states"],
            text_attention_mask=inputs["text_attention_mask"],
            speaker_embeds=inputs["speaker_embeds"],
            lyric_token_idx=inputs["lyric_token_idx"],
            lyric_mask=inputs["lyric_mask"],
            timestep=inputs["timestep"],
            ssl_hidden_states=ssl,
        )


def test_sample_and_ssl_losses(model, inputs, outputs):
    out = _forward(model, inputs, _ssl_lists(inputs))
    assert out.sample.shape == outputs["sample"].shape
    assert max_rel(out.sample, outputs["sample"]) <= TOL
    losses = dict(out.proj_losses)
    assert [name for name, _ in out.proj_losses] == ["mert", "m-hubert"]
    for name in ("mert", "m-hubert"):
        assert max_rel(losses[name], outputs[f"proj_loss.{name}"]) <= TOL, name


def test_padded_batch_tensor_equals_per_sample_lists(model, inputs):
    as_lists = dict(_forward(model, inputs, _ssl_lists(inputs)).proj_losses)
    as_batch = dict(_forward(model, inputs, [inputs["ssl_0"], inputs["ssl_1"]]).proj_losses)
    for name in as_lists:
        assert torch.equal(as_lists[name], as_batch[name])


def test_encode_and_lyric_encoder(model, inputs, outputs):
    with torch.no_grad():
        hidden, mask = model.encode(
            inputs["encoder_text_hidden_states"], inputs["text_attention_mask"], inputs["speaker_embeds"],
            inputs["lyric_token_idx"], inputs["lyric_mask"],
        )
        lyric = model.forward_lyric_encoder(inputs["lyric_token_idx"], inputs["lyric_mask"])
    assert max_rel(hidden, outputs["encoder_hidden_states"]) <= TOL
    assert torch.equal(mask, outputs["encoder_hidden_mask"])
    assert max_rel(lyric, outputs["lyric_encoder_out"]) <= TOL


def test_encode_then_decode_equals_forward(model, inputs, outputs):
    with torch.no_grad():
        hidden, mask = model.encode(
            inputs["encoder_text_hidden_states"], inputs["text_attention_mask"], inputs["speaker_embeds"],
            inputs["lyric_token_idx"], inputs["lyric_mask"],
        )
        sample = model.decode(inputs["hidden_states"], inputs["attention_mask"], hidden, mask, inputs["timestep"]).sample
    assert max_rel(sample, outputs["sample"]) <= TOL


def test_without_ssl_no_losses(model, inputs):
    assert _forward(model, inputs).proj_losses == []


def test_train_mode_dropout_is_active_only_in_training(golden_dir, inputs):
    model = ACEStepTransformer2DModel.from_pretrained(golden_dir / "ace_step_transformer")
    ids, mask = inputs["lyric_token_idx"], inputs["lyric_mask"]
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model.forward_lyric_encoder(ids, mask)
        torch.manual_seed(1)
        b = model.forward_lyric_encoder(ids, mask)
        model.eval()
        c = model.forward_lyric_encoder(ids, mask)
        d = model.forward_lyric_encoder(ids, mask)
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)


@pytest.mark.parametrize("by", ["folder", "file"])
def test_golden_lora(golden_dir, inputs, outputs, by):
    model = ACEStepTransformer2DModel.from_pretrained(golden_dir / "ace_step_transformer").eval()
    folder = next((golden_dir / "lora").glob("*_lora"))
    settings = load_lora(model, folder if by == "folder" else folder / "pytorch_lora_weights.safetensors")
    assert (settings.r, settings.alpha, settings.use_rslora) == (4, 32.0, True)
    assert settings.scale == pytest.approx(16.0)
    expected = load_file(golden_dir / "transformer_outputs_with_lora.safetensors")["sample"]
    sample = _forward(model, inputs).sample
    assert max_rel(sample, expected) <= TOL
    assert max_rel(sample, outputs["sample"]) > 0.1  # the adapter really acts
