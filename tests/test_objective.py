"""The training objective (spec §6.3): σ table, σ sampling, x_t, masked loss, CFG dropout."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.objective import (
    cfg_dropout,
    denoise_loss,
    noisy_latents,
    predicted_x0,
    sample_sigmas,
    total_loss,
    training_sigmas,
)


def test_sigma_table_matches_reference(golden):
    want = load_file(str(golden / "sampler.safetensors"))["train_sigmas"]
    got = training_sigmas()
    assert got.shape == (1000,) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert got[0] == 1.0 and abs(float(got[-1]) - 0.002994) < 1e-6


def test_sampled_sigma_statistics():
    sig = sample_sigmas(200_000, torch.Generator().manual_seed(0), training_sigmas())
    assert sig.shape == (200_000,)
    assert abs(float(sig.median()) - 0.75) < 0.005
    assert abs(float(sig.mean()) - 0.714) < 0.005
    assert float(sig.min()) >= 0.002994 - 1e-6 and float(sig.max()) <= 1.0


def test_sampled_sigma_deterministic_and_indexed():
    table = training_sigmas()
    a = sample_sigmas(64, torch.Generator().manual_seed(3), table)
    b = sample_sigmas(64, torch.Generator().manual_seed(3), table)
    c = sample_sigmas(64, torch.Generator().manual_seed(4), table)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Same draw by hand: u ~ N(0,1) → sigmoid → floor(1000u).
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(64,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a, table[(u * 1000).floor().long().clamp(0, 999)])
    # Every value is an entry of the table.
    assert torch.isin(a, table).all()


def test_noisy_latents_and_x0_formula():
    x0 = torch.randn(3, 8, 16, 5)
    eps = torch.randn(3, 8, 16, 5)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xt = noisy_latents(x0, eps, sigma)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.5 * eps[1] + 0.5 * x0[1])
    # The exact velocity gives back x0.
    assert torch.allclose(predicted_x0(eps - x0, xt, sigma), x0, atol=1e-6)


def test_denoise_loss_known_values_and_mask():
    b, t = 2, 4
    x0 = torch.zeros(b, 8, 16, t)
    xt = torch.zeros(b, 8, 16, t)
    sigma = torch.tensor([1.0, 0.5])
    v = torch.ones(b, 8, 16, t)  # x̂0 = −σ → error σ² everywhere
    full = torch.ones(b, t)
    assert torch.allclose(denoise_loss(v, xt, x0, sigma, full), torch.tensor((1.0 + 0.25) / 2))
    # Half the frames of sample 0 masked: its mean error halves and is scaled by the valid
    # fraction 1/2 again → 1/4 (spec §6.3 step 9).
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.allclose(denoise_loss(v, xt, x0, sigma, mask), torch.tensor((0.25 + 0.25) / 2))
    # Errors in masked frames do not count.
    v2 = v.clone()
    v2[0, :, :, 2:] = 100.0
    assert torch.allclose(denoise_loss(v2, xt, x0, sigma, mask), denoise_loss(v, xt, x0, sigma, mask))


def test_denoise_loss_is_differentiable_and_bf16():
    v = torch.randn(2, 8, 16, 3, dtype=torch.bfloat16, requires_grad=True)
    x0 = torch.randn(2, 8, 16, 3, dtype=torch.bfloat16)
    loss = denoise_loss(v, x0, x0, torch.tensor([0.3, 0.9]), torch.ones(2, 3))
    assert loss.dtype == torch.float32
    loss.backward()
    assert v.grad is not None and v.grad.dtype == torch.bfloat16


def test_total_loss_combination():
    d = torch.tensor(0.5)
    total, parts = total_loss(d, [("mert", torch.tensor(0.2)), ("m-hubert", torch.tensor(0.4))], ssl_coeff=1.0)
    assert torch.allclose(total, torch.tensor(0.8))
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in parts.values())
    assert {k: float(v) for k, v in parts.items()} == pytest.approx(
        {"loss": 0.8, "denoise_loss": 0.5, "mert_loss": 0.2, "mhubert_loss": 0.4})
    total, parts = total_loss(d, {"mert": torch.tensor(0.2), "m-hubert": torch.tensor(0.4)}, ssl_coeff=0.5)
    assert torch.allclose(total, torch.tensor(0.65))
    total, parts = total_loss(d, [])
    assert float(total) == 0.5 and parts["mert_loss"] == 0.0 and parts["loss"] == 0.5


def _batch(b=4000):
    return {
        "text_states": torch.ones(b, 3, 4),
        "text_mask": torch.ones(b, 3, dtype=torch.long),
        "speaker": torch.ones(b, 5),
        "lyric_ids": torch.full((b, 6), 7, dtype=torch.long),
        "lyric_mask": torch.ones(b, 6, dtype=torch.long),
        "latents": torch.ones(b, 2),
    }


def test_cfg_dropout_probabilities():
    batch = _batch()
    out = cfg_dropout(batch, torch.Generator().manual_seed(0))
    text_dropped = (out["text_states"].abs().sum((1, 2)) == 0).float().mean()
    speaker_dropped = (out["speaker"].abs().sum(1) == 0).float().mean()
    lyric_dropped = (out["lyric_ids"].sum(1) == 0).float().mean()
    assert abs(float(text_dropped) - 0.15) < 0.025
    assert abs(float(speaker_dropped) - 0.5) < 0.035
    assert abs(float(lyric_dropped) - 0.15) < 0.025
    # Lyric ids and mask drop together; the text mask is kept; other keys untouched.
    assert torch.equal(out["lyric_ids"].sum(1) == 0, out["lyric_mask"].sum(1) == 0)
    assert torch.equal(out["text_mask"], batch["text_mask"])
    assert out["latents"] is batch["latents"]
    # Independent draws: the patterns differ.
    assert not torch.equal(out["text_states"].sum((1, 2)) == 0, out["lyric_ids"].sum(1) == 0)
    # The input was not modified.
    assert float(batch["text_states"].min()) == 1.0 and int(batch["lyric_ids"].min()) == 7
    assert out["lyric_ids"].dtype == torch.long and out["text_states"].dtype == torch.float32


def test_cfg_dropout_deterministic_per_seed():
    a = cfg_dropout(_batch(64), torch.Generator().manual_seed(1))
    b = cfg_dropout(_batch(64), torch.Generator().manual_seed(1))
    c = cfg_dropout(_batch(64), torch.Generator().manual_seed(2))
    for key in ("text_states", "speaker", "lyric_ids", "lyric_mask"):
        assert torch.equal(a[key], b[key])
    assert any(not torch.equal(a[k], c[k]) for k in ("text_states", "speaker", "lyric_ids"))


def test_cfg_dropout_probability_extremes():
    out = cfg_dropout(_batch(16), torch.Generator().manual_seed(0), text_p=0.0, speaker_p=1.0, lyric_p=0.0)
    assert float(out["text_states"].min()) == 1.0
    assert float(out["speaker"].abs().max()) == 0.0
    assert int(out["lyric_mask"].min()) == 1
