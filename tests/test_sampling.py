"""The sampler: schedules and guidance math against the reference outputs (golden), and the
sampling loop (null conditioning, ERG hooks, guidance interval, seeding) on a small stand-in model
with the same encode/decode interface and module names as the ACE-Step transformer."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import ConfigError
from pipeline.sampling import (
    MomentumBuffer,
    SamplerSettings,
    apg,
    cfg,
    erg_diffusion_modules,
    erg_lyric_modules,
    euler_step,
    frames_for_duration,
    guidance_interval,
    guidance_scale_at,
    inference_sigmas,
    inference_timesteps,
    make_noise,
    null_conditioning,
    omega_scale,
    sample,
    train_sigmas,
)

TOL = 1e-5


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def ref(golden):
    return load_file(str(golden / "sampler.safetensors"))


# ------------------------------------------------------------------------------ golden math
def test_train_sigmas_match_reference(ref):
    assert max_rel(train_sigmas(), ref["train_sigmas"]) <= TOL
    assert train_sigmas()[0].item() == 1.0
    assert math.isclose(train_sigmas()[-1].item(), 0.003 / 1.002, rel_tol=1e-6)


@pytest.mark.parametrize("steps", [27, 60])
def test_inference_schedule_matches_reference(ref, steps):
    sig = inference_sigmas(steps)
    assert sig.shape == (steps + 1,) and sig[-1].item() == 0.0
    assert max_rel(sig, ref[f"infer{steps}_sigmas"]) <= TOL
    assert max_rel(inference_timesteps(sig), ref[f"infer{steps}_timesteps"]) <= TOL


def test_euler_omega_run_matches_reference(ref):
    sig = inference_sigmas(8)
    x = ref["euler_x0"]
    for i in range(8):
        x = euler_step(x, ref[f"euler_v{i}"], sig[i], sig[i + 1], omega=10.0)
    assert max_rel(x, ref["euler_x_final"]) <= TOL


def test_apg_with_shared_momentum_matches_reference(ref):
    buf = MomentumBuffer()
    for i in range(4):
        out = apg(ref[f"apg_cond{i}"], ref[f"apg_uncond{i}"], 15.0, buf)
        assert max_rel(out, ref[f"apg_out{i}"]) <= TOL, f"APG step {i}"


def test_cfg_matches_reference(ref):
    assert max_rel(cfg(ref["apg_cond0"], ref["apg_uncond0"], 7.0), ref["cfg_out"]) <= TOL


def test_omega_and_interval_values():
    assert math.isclose(omega_scale(10.0), 1.0462, abs_tol=1e-4)
    assert omega_scale(0.0) == 1.0
    assert guidance_interval(60, 0.5) == (15, 45)
    assert guidance_interval(60, 1.0) == (0, 60)
    assert guidance_scale_at(14, 60, 15.0) is None and guidance_scale_at(45, 60, 15.0) is None
    assert guidance_scale_at(15, 60, 15.0) == 15.0
    # decay: linear from the full scale to min_guidance_scale on the last guided step
    assert guidance_scale_at(15, 60, 15.0, decay=1.0, min_guidance_scale=3.0) == 15.0
    assert math.isclose(guidance_scale_at(44, 60, 15.0, decay=1.0, min_guidance_scale=3.0), 3.0)


def test_euler_step_without_omega_is_plain_euler():
    x, v = torch.randn(2, 8, 16, 5), torch.randn(2, 8, 16, 5)
    torch.testing.assert_close(euler_step(x, v, 0.8, 0.5, omega=0.0), x + (0.5 - 0.8) * v)


def test_apg_clips_and_drops_parallel_part():
    cond = torch.randn(1, 2, 16, 6)
    uncond = cond - 100.0 * cond  # difference parallel to cond: APG removes it entirely
    torch.testing.assert_close(apg(cond, uncond, 15.0), cond, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ the loop
class _Attn(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.to_q = torch.nn.Linear(d, d)


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = _Attn(d)
        self.cross_attn = _Attn(d)


class _LyricBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.linear_q = torch.nn.Linear(d, d)


class FakeTransformer(torch.nn.Module):
    """Same call interface and module names as ACEStepTransformer2DModel, a few weights only."""

    def __init__(self, blocks=20, lyric_blocks=6, d=4, text_dim=6, speaker_dim=3, vocab=10):
        super().__init__()
        torch.manual_seed(0)
        self.genre_embedder = torch.nn.Linear(text_dim, d)
        self.speaker_embedder = torch.nn.Linear(speaker_dim, d)
        self.lyric_embs = torch.nn.Embedding(vocab, d)
        self.lyric_encoder = torch.nn.Module()
        self.lyric_encoder.encoders = torch.nn.ModuleList(_LyricBlock(d) for _ in range(lyric_blocks))
        self.transformer_blocks = torch.nn.ModuleList(_Block(d) for _ in range(blocks))
        self.out = torch.nn.Linear(d, 8)
        self.calls = []  # (kind, number of active forward hooks in the DiT)

    def _hooks(self):
        return sum(len(m._forward_hooks) for m in self.transformer_blocks.modules())

    def encode(self, encoder_text_hidden_states, text_attention_mask, speaker_embeds, lyric_token_idx, lyric_mask):
        lyr = self.lyric_embs(lyric_token_idx)
        for blk in self.lyric_encoder.encoders:
            lyr = lyr + blk.self_attn.linear_q(lyr)
        states = torch.cat(
            [self.speaker_embedder(speaker_embeds)[:, None], self.genre_embedder(encoder_text_hidden_states), lyr], 1
        )
        mask = torch.cat([torch.ones_like(text_attention_mask[:, :1]), text_attention_mask, lyric_mask], 1)
        self.calls.append(("encode", self._hooks()))
        return states, mask

    def decode(self, hidden_states, attention_mask, encoder_hidden_states, encoder_hidden_mask, timestep):
        self.calls.append(("decode", self._hooks()))
        ctx = encoder_hidden_states.mean(1)
        for blk in self.transformer_blocks:
            ctx = ctx + 0.1 * torch.tanh(blk.attn.to_q(ctx) + blk.cross_attn.to_q(ctx))
        bias = self.out(ctx)[:, :, None, None] * (timestep[:, None, None, None] / 1000)
        return (0.3 * hidden_states + bias,)


def _cond(batch=2, text_len=5, lyric_len=7):
    g = torch.Generator().manual_seed(1)
    return {
        "text_states": torch.randn(batch, text_len, 6, generator=g),
        "text_mask": torch.ones(batch, text_len),
        "speaker": torch.zeros(batch, 3),
        "lyric_ids": torch.randint(1, 10, (batch, lyric_len), generator=g),
        "lyric_mask": torch.ones(batch, lyric_len),
    }


def test_settings_defaults_and_validation():
    s = SamplerSettings()
    assert (s.steps, s.guidance_scale, s.cfg_type, s.omega) == (60, 15.0, "apg", 10.0)
    assert (s.use_erg_tag, s.use_erg_lyric, s.use_erg_diffusion, s.shift) == (True, False, True, 3.0)
    with pytest.raises(ConfigError, match="cfg-type"):
        SamplerSettings(cfg_type="cfg_star").validate()
    with pytest.raises(ConfigError, match="steps"):
        SamplerSettings(steps=0).validate()


def test_frames_for_duration():
    assert frames_for_duration(240) == 2583
    assert frames_for_duration(60) == 645
    assert frames_for_duration(2) == 21


def test_noise_is_per_seed_and_batch_independent():
    a = make_noise(9, seeds=[3, 4])
    b = make_noise(9, seeds=[4])
    assert a.shape == (2, 8, 16, 9)
    torch.testing.assert_close(a[1:], b, rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])


def test_sample_is_deterministic_per_seed():
    model = FakeTransformer()
    s = SamplerSettings(steps=6)
    a = sample(model, _cond(), s, seeds=[11, 12], n_frames=5, progress=False)
    b = sample(model, _cond(), s, seeds=[11, 12], n_frames=5, progress=False)
    c = sample(model, _cond(), s, seeds=[13, 12], n_frames=5, progress=False)
    assert a.shape == (2, 8, 16, 5) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # an int seed means seed, seed+1, ...
    torch.testing.assert_close(sample(model, _cond(), s, seeds=11, n_frames=5, progress=False), a, rtol=0, atol=0)


def test_guidance_only_inside_interval_with_erg_hooks_only_on_null_pass():
    model = FakeTransformer()
    steps = 8
    sample(model, _cond(), SamplerSettings(steps=steps), seeds=0, n_frames=4, progress=False)
    decodes = [h for kind, h in model.calls if kind == "decode"]
    start, end = guidance_interval(steps, 0.5)
    assert len(decodes) == steps + (end - start)
    # 5 DiT blocks (15..19) × (attn.to_q, cross_attn.to_q) hooked during the unconditional pass only
    assert sorted(set(decodes)) == [0, 10]
    assert decodes.count(10) == end - start
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # nothing left behind


def test_small_models_hook_only_existing_blocks():
    model = FakeTransformer(blocks=17, lyric_blocks=5)
    assert len(erg_diffusion_modules(model)) == 4  # blocks 15, 16
    assert len(erg_lyric_modules(model)) == 1  # block 4
    tiny = FakeTransformer(blocks=2, lyric_blocks=2)
    assert erg_diffusion_modules(tiny) == [] and erg_lyric_modules(tiny) == []
    sample(tiny, _cond(), SamplerSettings(steps=4, use_erg_lyric=True), seeds=0, n_frames=3, progress=False)


def test_null_conditioning_variants():
    c = _cond()
    c["text_states_null"] = torch.full_like(c["text_states"], 7.0)
    plain = null_conditioning(c, SamplerSettings())
    assert torch.count_nonzero(plain["text_states"]) == 0  # ERG text unused without lyric ERG
    assert torch.count_nonzero(plain["lyric_ids"]) == 0
    assert torch.equal(plain["lyric_mask"], c["lyric_mask"]) and torch.equal(plain["text_mask"], c["text_mask"])
    erg = null_conditioning(c, SamplerSettings(use_erg_lyric=True))
    assert torch.equal(erg["text_states"], c["text_states_null"]) and torch.equal(erg["lyric_ids"], c["lyric_ids"])
    no_tag = null_conditioning(c, SamplerSettings(use_erg_lyric=True, use_erg_tag=False))
    assert torch.count_nonzero(no_tag["text_states"]) == 0


def test_lyric_erg_weakens_lyric_encoder_in_null_encode():
    model = FakeTransformer()
    s = SamplerSettings(steps=4, use_erg_lyric=True)
    a = sample(model, _cond(), s, seeds=0, n_frames=3, progress=False)
    b = sample(model, _cond(), s.replace(use_erg_lyric=False), seeds=0, n_frames=3, progress=False)
    assert not torch.allclose(a, b)


def test_unguided_sampling_is_plain_euler_on_the_conditional_velocity():
    model = FakeTransformer()
    c = _cond(batch=1)
    s = SamplerSettings(steps=5, guidance_scale=1.0, omega=0.0)
    got = sample(model, c, s, seeds=[5], n_frames=4, progress=False)
    x = make_noise(4, seeds=[5])
    sig = inference_sigmas(5)
    enc, mask = model.encode(c["text_states"], c["text_mask"], c["speaker"], c["lyric_ids"], c["lyric_mask"])
    for i in range(5):
        v = model.decode(x, torch.ones(1, 4), enc, mask, (1000 * sig[i]).expand(1))[0]
        x = x + (sig[i + 1] - sig[i]) * v
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_cfg_type_cfg_differs_from_apg_and_training_mode_is_restored():
    model = FakeTransformer()
    model.train()
    a = sample(model, _cond(), SamplerSettings(steps=4, guidance_interval=1.0), seeds=0, n_frames=3, progress=False)
    b = sample(model, _cond(), SamplerSettings(steps=4, guidance_interval=1.0, cfg_type="cfg"), seeds=0, n_frames=3, progress=False)
    assert not torch.allclose(a, b)
    assert model.training


# ------------------------------------------------------------------------------ real transformer
def _golden_cond(golden):
    inp = load_file(str(golden / "transformer_inputs.safetensors"))
    cond = {
        "text_states": inp["encoder_text_hidden_states"],
        "text_mask": inp["text_attention_mask"],
        "speaker": inp["speaker_embeds"],
        "lyric_ids": inp["lyric_token_idx"],
        "lyric_mask": inp["lyric_mask"],
    }
    return inp, cond


def test_one_unguided_step_is_x_minus_velocity_of_real_transformer(golden):
    mod = pytest.importorskip("pipeline.models.transformer")
    model = mod.ACEStepTransformer2DModel.from_pretrained(golden / "ace_step_transformer", torch_dtype=torch.float32)
    inp, cond = _golden_cond(golden)
    batch, frames = inp["hidden_states"].shape[0], inp["hidden_states"].shape[-1]
    got = sample(model, cond, SamplerSettings(steps=1, guidance_scale=1.0, omega=0.0), seeds=[0, 1],
                 n_frames=frames, progress=False)
    noise = make_noise(frames, seeds=[0, 1])
    with torch.no_grad():
        v = model(hidden_states=noise, attention_mask=torch.ones(batch, frames),
                  encoder_text_hidden_states=cond["text_states"], text_attention_mask=cond["text_mask"],
                  speaker_embeds=cond["speaker"], lyric_token_idx=cond["lyric_ids"], lyric_mask=cond["lyric_mask"],
                  timestep=torch.full((batch,), 1000.0)).sample
    assert max_rel(got, noise - v) <= TOL


def test_erg_hooks_reach_real_module_names(golden):
    """A random model as deep as the released one (24 DiT blocks, 6 lyric blocks) at tiny width:
    the ERG hooks find their modules and change the guided result."""
    import json

    mod = pytest.importorskip("pipeline.models.transformer")
    config = json.loads((golden / "ace_step_transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(num_layers=24, lyric_encoder_num_blocks=6)
    torch.manual_seed(0)
    model = mod.ACEStepTransformer2DModel(**config).eval()
    assert len(erg_diffusion_modules(model)) == 10 and len(erg_lyric_modules(model)) == 2
    _, cond = _golden_cond(golden)
    cond = {k: v[:1] for k, v in cond.items()}
    base = SamplerSettings(steps=2, guidance_interval=1.0, use_erg_diffusion=False)
    plain = sample(model, cond, base, seeds=0, n_frames=6, progress=False)
    erg_d = sample(model, cond, base.replace(use_erg_diffusion=True), seeds=0, n_frames=6, progress=False)
    erg_l = sample(model, cond, base.replace(use_erg_lyric=True), seeds=0, n_frames=6, progress=False)
    assert not torch.allclose(plain, erg_d) and not torch.allclose(plain, erg_l)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
