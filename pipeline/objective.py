"""The training objective of the official ACE-Step v1 LoRA trainer (spec §6.3), as plain functions.

One step: CFG dropout on the conditioning → noise ε → σ drawn from the shift-3 table through a
logit-normal index → x_t = σ·ε + (1−σ)·x0 → the model's velocity v̂ → x̂0 = x_t − σ·v̂ → masked MSE
against x0 (+ ssl_coeff × the mean of the two SSL projection losses).

Everything random takes an explicit ``torch.Generator`` so a run is reproducible from its seed.
No model is imported here: the training loop passes tensors in.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 3.0
# CFG dropout probabilities of the official trainer.
TEXT_DROP_P = 0.15
SPEAKER_DROP_P = 0.5
LYRIC_DROP_P = 0.15
SSL_NAMES = {"mert": "mert_loss", "m-hubert": "mhubert_loss", "mhubert": "mhubert_loss"}


def training_sigmas(shift: float = SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The σ table S_k, k = 0..N−1: s_k = (N−k)/N shifted to shift·s/(1+(shift−1)·s).
    For shift 3: 1.0 … 0.002994 (fp32, computed in fp32 like the reference scheduler)."""
    s = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(
    batch_size: int,
    generator: torch.Generator,
    sigmas: torch.Tensor,
    device: str | torch.device | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """σ [B] for one batch: u ~ N(mean, std) from ``generator``, sigmoid, index = clamp(⌊N·u⌋, 0, N−1)
    into ``sigmas``. With the shift-3 table the median σ is 0.75 and the mean ≈ 0.714.
    The model's timestep input is 1000·σ."""
    u = torch.normal(logit_mean, logit_std, size=(batch_size,), generator=generator,
                     device=generator.device)
    return _table_sigmas(torch.sigmoid(u), sigmas).to(device if device is not None else sigmas.device)


def sigma_grid(n: int, sigmas: torch.Tensor, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """σ [n], a fixed grid over the training σ distribution: the midpoint quantiles (i + ½)/n of the
    logit-normal, mapped into the table as ``sample_sigmas`` does (the validation loss's noise levels).
    For n = 8 and the shift-3 table: 0.40 … 0.93, the mean over the grid ≈ the training loss's mean."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    z = logit_mean + logit_std * math.sqrt(2.0) * torch.erfinv(2 * q - 1)
    return _table_sigmas(torch.sigmoid(z).float(), sigmas)


def _table_sigmas(u: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """u in (0, 1) → the table entry at index clamp(⌊N·u⌋, 0, N−1)."""
    n = sigmas.shape[0]
    idx = torch.clamp((u * n).floor().long(), 0, n - 1)
    return sigmas.to(idx.device)[idx]


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ [B] shaped to broadcast over a [B, ...] tensor, in its dtype and device."""
    return sigma.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = σ·ε + (1−σ)·x0 (σ per sample)."""
    s = _per_sample(sigma, x0)
    return s * noise + (1.0 - s) * x0


def predicted_x0(model_output: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_t − σ·v̂: the trainer regresses x0 (velocity loss weighted by σ²)."""
    return x_t - _per_sample(sigma, x_t) * model_output


def denoise_loss(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    latent_mask: torch.Tensor,
) -> torch.Tensor:
    """The masked MSE of spec §6.3 step 9: per sample the mean over all C·H·T elements of
    (m·x̂0 − m·x0)², times the fraction of valid frames, then the batch mean.
    ``latent_mask`` [B, T] (1 valid, 0 pad). Reduced in fp32 so bf16 training logs the same value."""
    pred = predicted_x0(model_output, x_t, sigma).float()
    target = x0.float()
    b = x0.shape[0]
    mask = latent_mask.to(device=x0.device, dtype=torch.float32).reshape(b, *([1] * (x0.ndim - 2)), -1)
    mask = mask.expand_as(pred)
    per_sample = ((pred * mask - target * mask) ** 2).reshape(b, -1).mean(dim=1)
    per_sample = per_sample * mask.reshape(b, -1).mean(dim=1)
    return per_sample.mean()


def total_loss(
    denoise: torch.Tensor,
    proj_losses: Sequence[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | None,
    ssl_coeff: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = denoise + ssl_coeff × mean of the SSL projection losses (none: denoise alone).

    ``proj_losses``: the transformer's ``[("mert", l1), ("m-hubert", l2)]`` (or a dict).
    Returns (total, parts) with parts = {loss, denoise_loss, mert_loss, mhubert_loss} as detached
    fp32 scalars on the losses' device (an absent SSL loss is 0): reading them is left to the caller,
    which fetches all of a step's numbers at once (each read is a GPU→CPU sync)."""
    items = list(proj_losses.items()) if isinstance(proj_losses, Mapping) else list(proj_losses or [])
    total = denoise
    if items:
        total = denoise + ssl_coeff * torch.stack([loss.float() for _, loss in items]).mean()
    zero = torch.zeros((), device=denoise.device)
    parts = {"loss": total.detach().float(), "denoise_loss": denoise.detach().float(), "mert_loss": zero,
             "mhubert_loss": zero}
    for name, loss in items:
        parts[SSL_NAMES.get(name, f"{name}_loss")] = loss.detach().float()
    return total, parts


def _drop(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``x`` with the samples where ``drop`` [B] is True set to zero (a new tensor)."""
    d = drop.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(d, torch.zeros((), dtype=x.dtype, device=x.device), x)


def cfg_dropout(
    batch: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    text_p: float = TEXT_DROP_P,
    speaker_p: float = SPEAKER_DROP_P,
    lyric_p: float = LYRIC_DROP_P,
) -> dict:
    """Classifier-free-guidance dropout, an independent Bernoulli per sample and per kind:
    text states → 0 with ``text_p`` (text_mask kept, as the official trainer does), speaker → 0
    with ``speaker_p``, lyric ids **and** lyric mask → 0 with ``lyric_p``.

    ``batch`` holds text_states [B,L,D], text_mask, speaker [B,S], lyric_ids [B,L], lyric_mask;
    other keys pass through. The input is not modified; a new dict is returned. The three draws
    are always made, in the order text, speaker, lyrics, so a seed gives the same pattern
    whatever keys the batch has."""
    b = batch["text_states"].shape[0] if "text_states" in batch else batch["lyric_ids"].shape[0]
    dev = generator.device
    drop_text = torch.rand(b, generator=generator, device=dev) < text_p
    drop_speaker = torch.rand(b, generator=generator, device=dev) < speaker_p
    drop_lyric = torch.rand(b, generator=generator, device=dev) < lyric_p
    out = dict(batch)
    if "text_states" in out:
        out["text_states"] = _drop(out["text_states"], drop_text)
    if "speaker" in out:
        out["speaker"] = _drop(out["speaker"], drop_speaker)
    for key in ("lyric_ids", "lyric_mask"):
        if key in out:
            out[key] = _drop(out[key], drop_lyric)
    return out
