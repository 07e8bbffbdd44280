"""The sampling loop: noise → latents with the Euler+omega scheduler and APG/CFG guidance, using
the transformer's split ``encode`` (conditioning, once per run) / ``decode`` (denoiser, per step).

Null (unconditional) conditioning follows the reference pipeline (spec §8):
- text states zeroed — or the ERG-null UMT5 states when both ``use_erg_tag`` and ``use_erg_lyric``;
- speaker zeroed;
- lyric ids zeroed — or, with ``use_erg_lyric``, the real ids with the ``linear_q`` outputs of
  lyric-encoder blocks 4–5 scaled by 0.01 ("energy-based" weakening instead of removal);
- with ``use_erg_diffusion`` the unconditional decode also scales the ``attn.to_q`` and
  ``cross_attn.to_q`` outputs of DiT blocks 15–19 by 0.01.
All these hooks exist only during the call that needs them. On small (test/demo) models only the
blocks that exist are hooked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from pipeline.errors import ConfigError
from pipeline.sampling.guidance import MomentumBuffer, apg, cfg, guidance_scale_at
from pipeline.sampling.schedule import euler_step, inference_sigmas, inference_timesteps

from pipeline.models.codec import CODEC_SAMPLE_RATE, HOP_LENGTH, LATENT_CHANNELS, LATENT_HEIGHT, TIME_MULTIPLE

# ERG ("temperature") settings of the reference pipeline.
ERG_FACTOR = 0.01
ERG_LYRIC_BLOCKS = range(4, 6)  # lyric-encoder blocks whose linear_q is weakened
ERG_DIFFUSION_BLOCKS = range(15, 20)  # DiT blocks whose attn/cross_attn to_q is weakened

CFG_TYPES = ("apg", "cfg")


@dataclass
class SamplerSettings:
    """How to sample. Defaults are the reference pipeline's (GUI: lyric ERG off)."""

    steps: int = 60
    guidance_scale: float = 15.0
    cfg_type: str = "apg"  # "apg" (adaptive projected guidance, default) or "cfg" (plain)
    omega: float = 10.0  # "granularity": sharpening of each Euler step (0 = plain Euler)
    guidance_interval: float = 0.5  # fraction of the run (the middle steps) that is guided
    guidance_interval_decay: float = 0.0  # >0: scale falls toward min_guidance_scale in the interval
    min_guidance_scale: float = 3.0
    use_erg_tag: bool = True  # ERG-null text states (only used together with use_erg_lyric)
    use_erg_lyric: bool = False
    use_erg_diffusion: bool = True
    shift: float = 3.0

    def validate(self) -> "SamplerSettings":
        if int(self.steps) < 1:
            raise ConfigError(f"sampler steps must be >= 1 (got {self.steps}); pass e.g. --steps 60")
        if self.cfg_type not in CFG_TYPES:
            raise ConfigError(
                f"unknown cfg_type {self.cfg_type!r}; use one of {', '.join(CFG_TYPES)} (--cfg-type)"
            )
        if not 0.0 <= self.guidance_interval <= 1.0:
            raise ConfigError(
                f"guidance_interval must be within [0, 1] (got {self.guidance_interval})"
            )
        if self.shift <= 0:
            raise ConfigError(f"sampler shift must be > 0 (got {self.shift})")
        return self

    def replace(self, **changes) -> "SamplerSettings":
        return dataclasses.replace(self, **changes)

    @property
    def guided(self) -> bool:
        # Scale 1 is the conditional prediction itself and 0 is what the reference treats as "off":
        # neither needs an unconditional pass.
        return self.guidance_scale not in (0.0, 1.0)


def frames_for_duration(duration_s: float) -> int:
    """Latent frames for a duration, as the reference computes them: int(d·44100/512/8)."""
    return int(duration_s * CODEC_SAMPLE_RATE / HOP_LENGTH / TIME_MULTIPLE)


def duration_for_frames(n_frames: int) -> float:
    return n_frames * HOP_LENGTH * TIME_MULTIPLE / CODEC_SAMPLE_RATE


# --------------------------------------------------------------------------------------- hooks
def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    mod = root
    for part in path.split("."):
        if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) and part.isdigit():
            idx = int(part)
            if idx >= len(mod):
                return None
            mod = mod[idx]
        else:
            mod = getattr(mod, part, None)
            if mod is None:
                return None
    return mod


def erg_lyric_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The lyric-encoder query projections weakened by lyric ERG (blocks 4–5 that exist)."""
    mods = [_submodule(transformer, f"lyric_encoder.encoders.{j}.self_attn.linear_q") for j in ERG_LYRIC_BLOCKS]
    return [m for m in mods if m is not None]


def erg_diffusion_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The DiT query projections weakened by diffusion ERG (blocks 15–19 that exist)."""
    mods = []
    for b in ERG_DIFFUSION_BLOCKS:
        for name in ("attn.to_q", "cross_attn.to_q"):
            m = _submodule(transformer, f"transformer_blocks.{b}.{name}")
            if m is not None:
                mods.append(m)
    return mods


@contextlib.contextmanager
def scaled_outputs(modules: Iterable[torch.nn.Module], factor: float):
    """Multiply the outputs of ``modules`` by ``factor`` for the duration of the block.

    Forward hooks on the module as found in the model, so a LoRA-wrapped projection is scaled
    with its adapter contribution included, like the reference's hooks."""
    handles = [m.register_forward_hook(lambda _m, _i, out: out * factor) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------- the loop
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer inside a DistributedDataParallel wrapper (the trainer may hand one over):
    encode/decode live on the inner module."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _model_device_dtype(transformer: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(transformer.parameters())
    return p.device, p.dtype


def _sample_out(result) -> torch.Tensor:
    """``decode`` returns an output object with ``.sample`` or a tuple whose first item is it."""
    if hasattr(result, "sample"):
        return result.sample
    if isinstance(result, (tuple, list)):
        return result[0]
    return result


def make_noise(
    n_frames: int,
    seeds: Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """x_T ~ N(0, I) of shape [B, 8, 16, n_frames], fp32 on the CPU: one generator per sample so
    a sample's noise depends only on its seed (not on the batch, the device or the dtype)."""
    if generators is None:
        if seeds is None:
            raise ValueError("make_noise needs seeds or generators")
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    shape = (1, LATENT_CHANNELS, LATENT_HEIGHT, n_frames)
    return torch.cat(
        [torch.randn(shape, generator=g, dtype=torch.float32, device=g.device).cpu() for g in generators]
    )


def resolve_seeds(seeds: int | Sequence[int] | None, batch: int) -> list[int]:
    """An int seeds the batch as seed, seed+1, …; None draws random seeds (returned so they can be
    recorded)."""
    if seeds is None:
        return [random.randrange(2**31) for _ in range(batch)]
    if isinstance(seeds, int):
        return [seeds + i for i in range(batch)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != batch:
        raise ConfigError(f"got {len(seeds)} seeds for a batch of {batch}; give one seed per sample")
    return seeds


def null_conditioning(cond: Mapping[str, torch.Tensor], settings: SamplerSettings) -> dict[str, torch.Tensor]:
    """The unconditional inputs (see the module docstring). Masks are kept."""
    text_null = cond.get("text_states_null")
    if settings.use_erg_lyric and settings.use_erg_tag and text_null is not None:
        text = text_null
    else:
        text = torch.zeros_like(cond["text_states"])
    lyric_ids = cond["lyric_ids"] if settings.use_erg_lyric else torch.zeros_like(cond["lyric_ids"])
    return {
        "text_states": text,
        "text_mask": cond["text_mask"],
        "speaker": torch.zeros_like(cond["speaker"]),
        "lyric_ids": lyric_ids,
        "lyric_mask": cond["lyric_mask"],
    }


def _encode(transformer, c: Mapping[str, torch.Tensor]):
    return transformer.encode(
        encoder_text_hidden_states=c["text_states"],
        text_attention_mask=c["text_mask"],
        speaker_embeds=c["speaker"],
        lyric_token_idx=c["lyric_ids"],
        lyric_mask=c["lyric_mask"],
    )


def _prepare_cond(cond: Mapping[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("text_states", "text_mask", "speaker", "lyric_ids", "lyric_mask", "text_states_null"):
        t = cond.get(key)
        if t is None:
            continue
        if key in ("text_states", "speaker", "text_states_null"):
            out[key] = t.to(device=device, dtype=dtype)
        elif key == "lyric_ids":
            out[key] = t.to(device=device, dtype=torch.long)
        else:
            out[key] = t.to(device=device)
    missing = {"text_states", "text_mask", "speaker", "lyric_ids", "lyric_mask"} - out.keys()
    if missing:
        raise ValueError(f"conditioning is missing {sorted(missing)}")
    return out


@torch.no_grad()
def sample(
    transformer: torch.nn.Module,
    cond: Mapping[str, torch.Tensor],
    settings: SamplerSettings | None = None,
    seeds: int | Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    duration_s: float | None = None,
    n_frames: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample latents [B, 8, 16, T] (fp32, on the transformer's device) for the conditioning
    ``cond`` = {"text_states" [B,L,D], "text_mask" [B,L], "speaker" [B,S], "lyric_ids" [B,K],
    "lyric_mask" [B,K], optional "text_states_null" (ERG-null UMT5 states)}.

    T is ``n_frames`` or frames_for_duration(``duration_s``). Noise comes from ``generators`` or
    from one CPU generator per seed (``seeds``: list, int or None = random).
    The transformer is switched to eval mode for the call and restored afterwards.
    """
    settings = (settings or SamplerSettings()).validate()
    transformer = unwrap(transformer)
    device, dtype = _model_device_dtype(transformer)
    c = _prepare_cond(cond, device, dtype)
    batch = c["text_states"].shape[0]
    if n_frames is None:
        if duration_s is None:
            raise ValueError("sample needs duration_s or n_frames")
        n_frames = frames_for_duration(duration_s)
    if n_frames < 1:
        raise ConfigError(
            f"duration {duration_s} s gives no latent frames; ask for at least "
            f"{duration_for_frames(1):.2f} s"
        )
    if generators is not None:
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
        noise = make_noise(n_frames, generators=generators)
    else:
        noise = make_noise(n_frames, seeds=resolve_seeds(seeds, batch))

    was_training = transformer.training
    transformer.eval()
    try:
        return _run(transformer, c, settings, noise.to(device), n_frames, progress, dtype)
    finally:
        transformer.train(was_training)


def _run(transformer, c, settings: SamplerSettings, x: torch.Tensor, n_frames, progress, dtype):
    batch = x.shape[0]
    device = x.device
    enc, enc_mask = _encode(transformer, c)
    enc_null = None
    if settings.guided:
        null = null_conditioning(c, settings)
        lyric_hooks = erg_lyric_modules(transformer) if settings.use_erg_lyric else []
        with scaled_outputs(lyric_hooks, ERG_FACTOR):
            enc_null, _ = _encode(transformer, null)
    diffusion_hooks = erg_diffusion_modules(transformer) if settings.use_erg_diffusion else []

    sigmas = inference_sigmas(settings.steps, shift=settings.shift).to(device)
    timesteps = inference_timesteps(sigmas)
    attention_mask = torch.ones(batch, n_frames, device=device, dtype=dtype)
    momentum = MomentumBuffer()

    def denoise(x, states, hooks, t):
        with scaled_outputs(hooks, ERG_FACTOR):
            out = transformer.decode(
                hidden_states=x.to(dtype),
                attention_mask=attention_mask,
                encoder_hidden_states=states,
                encoder_hidden_mask=enc_mask,
                timestep=t,
            )
        return _sample_out(out).to(torch.float32)

    for i in tqdm(range(settings.steps), desc="sampling", unit="step", disable=not progress, leave=False):
        t = timesteps[i].expand(batch)
        v = denoise(x, enc, [], t)
        scale = None
        if settings.guided:
            scale = guidance_scale_at(
                i,
                settings.steps,
                settings.guidance_scale,
                settings.guidance_interval,
                settings.guidance_interval_decay,
                settings.min_guidance_scale,
            )
        if scale is not None:
            v_null = denoise(x, enc_null, diffusion_hooks, t)
            if settings.cfg_type == "apg":
                v = apg(v, v_null, scale, momentum)
            else:
                v = cfg(v, v_null, scale)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1], settings.omega)
    return x
