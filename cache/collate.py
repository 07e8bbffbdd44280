"""One song -> one training sample -> a batch: the random crop, the prompt-variant pick, the collate.

This is the single definition of the batch layout; the cached loader (cache/loader.py) and the live
source both build batches with these functions, which is what keeps cached == live.

Batch (B samples):
    keys         list[str]
    latents      float [B,8,16,T]        make_batch crops every sample to the same T (no padding)
    latent_mask  float [B,T]             1 valid / 0 pad (all ones from make_batch)
    text_states  float [B,L_txt,D_txt]   the chosen prompt variant, zero padded
    text_mask    long  [B,L_txt]
    speaker      float [B,S]             zeros (the released checkpoint has no speaker input, spec §4.2)
    lyric_ids    long  [B,L_lyr]         zero padded
    lyric_mask   long  [B,L_lyr]
    mert         list of B float [T_m,D_m]  (None entries when the stream was not loaded)
    mhubert      list of B float [T_h,D_h]
"""
from __future__ import annotations

import hashlib
import math
import random

import torch

from cache.schema import LATENT_RATE, MERT_RATE, MHUBERT_RATE, SongFeatures


def max_frames(max_seconds: float) -> int:
    """Latent frames in ``max_seconds`` (240 s -> 2583, as the reference pipeline counts)."""
    return int(max_seconds * LATENT_RATE)


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The random source of one sample: depends on (seed, epoch, song) only, never on worker count."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _frame_span(start_s: float, end_s: float, rate: float, length: int) -> slice:
    begin = min(max(round(start_s * rate), 0), length)
    end = min(max(round(end_s * rate), begin), length)
    return slice(begin, end)


def crop_song(features: SongFeatures, start_frame: int, n_frames: int) -> SongFeatures:
    """Cut the same time span from every time stream.

    The window is [start_frame, start_frame + n_frames) latent frames, i.e. times t0..t1 seconds;
    MERT keeps frames round(t0*75)..round(t1*75), mHuBERT round(t0*50)..round(t1*50). Text and
    lyrics are not timed and stay whole.
    """
    if features.latents is None:
        raise ValueError(f"song {features.key!r}: cropping needs latents")
    total = features.latents.shape[-1]
    start = max(0, min(int(start_frame), total))
    stop = max(start, min(start + int(n_frames), total))
    t0, t1 = start / LATENT_RATE, stop / LATENT_RATE
    # Copies, not views: a view would keep (and ship from a DataLoader worker) the whole song.
    changes: dict = {"latents": features.latents[..., start:stop].clone()}
    for name, rate in (("mert", MERT_RATE), ("mhubert", MHUBERT_RATE)):
        if getattr(features, name) is not None:
            changes[name] = _cut_ssl(getattr(features, name), t0, t1, rate)
    return features.replace(**changes)


def _cut_ssl(frames: torch.Tensor, t0: float, t1: float, rate: float) -> torch.Tensor:
    """The SSL frames [T, D] of the time span t0..t1 seconds (a copy)."""
    return frames[_frame_span(t0, t1, rate, frames.shape[0])].clone()


def random_crop_start(total_frames: int, window_frames: int, rng: random.Random) -> int:
    """Uniform start of a window of ``window_frames`` in a song of ``total_frames`` (0 when it fits)."""
    if total_frames <= window_frames:
        return 0
    return rng.randrange(total_frames - window_frames + 1)


def choose_variant(features: SongFeatures, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one of the K prompt variants uniformly; returns (states [L,D], mask [L]).

    Variants were padded to the longest one when stored; the trailing padding of the chosen one is
    cut so it equals encoding that prompt alone.
    """
    if features.text_states is None or features.text_masks is None:
        raise ValueError(f"song {features.key!r}: choosing a prompt variant needs the text stream")
    k = rng.randrange(features.text_states.shape[0])
    mask = features.text_masks[k].long()
    valid = torch.nonzero(mask).flatten()
    length = int(valid[-1]) + 1 if len(valid) else mask.shape[0]
    return features.text_states[k, :length], mask[:length]


def make_sample(features: SongFeatures, rng: random.Random, max_seconds: float, frames: int | None = None) -> dict:
    """Random crop + random prompt variant -> one sample for ``collate``. The crop is ``frames`` long
    (default: the whole song, at most ``max_seconds``)."""
    window = max_frames(max_seconds) if frames is None else frames
    total = features.latents.shape[-1]
    if total > window:
        features = crop_song(features, random_crop_start(total, window, rng), window)
    states, mask = choose_variant(features, rng)
    return {"key": features.key, "latents": features.latents, "text_states": states, "text_mask": mask,
            "lyric_ids": features.lyric_ids, "mert": features.mert, "mhubert": features.mhubert}


def batch_frames(lengths: list[int], max_seconds: float) -> int:
    """The crop length of every sample of one batch: the shortest song's, at most ``max_seconds``.

    Equal lengths mean no padded frames, and that matters: the patch embedding's GroupNorm takes its
    statistics over all frames and the FFN's depthwise conv mixes neighbours, so padding would change
    the valid frames' result (a sample would depend on its neighbours in the batch)."""
    return min(min(lengths), max_frames(max_seconds))


def make_batch(songs: list[SongFeatures], rngs: list[random.Random], max_seconds: float, speaker_dim: int = 512,
               dtype: torch.dtype | None = None) -> dict:
    """Songs -> one batch of equal-length random crops (``batch_frames``); one random source per song."""
    frames = batch_frames([song.latents.shape[-1] for song in songs], max_seconds)
    return collate([make_sample(song, rng, max_seconds, frames) for song, rng in zip(songs, rngs)], speaker_dim, dtype)


# ------------------------------------------------------------------ shape buckets
# A compiled model compiles once per input shape. Crops are cut down to window·2^(-i/4) frames
# (a crop keeps more than 84 % of what the song offers) and the conditioning (speaker + prompt +
# lyrics) is padded up to ⌈2^(j/2)⌉ tokens, so a run over any songs sees a few shapes only.
LATENT_BUCKETS_PER_OCTAVE = 4
CONDITION_BUCKETS_PER_OCTAVE = 2


def latent_bucket(frames: int, window: int) -> int:
    """The longest crop length window·2^(-i/4), i = 0, 1, ..., that is not above ``frames``."""
    i, edge = 0, window
    while edge > frames:
        i += 1
        edge = int(window * 2 ** (-i / LATENT_BUCKETS_PER_OCTAVE))
    return max(edge, 1)


def condition_bucket(tokens: int) -> int:
    """The shortest length ⌈2^(j/2)⌉, j = 0, 1, ..., that holds ``tokens``."""
    j = 0
    while math.ceil(2 ** (j / CONDITION_BUCKETS_PER_OCTAVE)) < tokens:
        j += 1
    return math.ceil(2 ** (j / CONDITION_BUCKETS_PER_OCTAVE))


def bucket_shape(batch: dict, max_seconds: float) -> tuple[int, int]:
    """(latent frames, lyric tokens) of ``batch`` once ``bucket_batch`` has cut it: the sizes the
    compiled model computes on (no randomness: only the windows' starts are drawn)."""
    shortest = int(batch["latent_mask"].sum(dim=1, dtype=torch.long).min())  # a bf16 sum rounds (1938 → 1936)
    prompt, lyrics = batch["text_states"].shape[1], batch["lyric_ids"].shape[1]
    return latent_bucket(shortest, max_frames(max_seconds)), condition_bucket(1 + prompt + lyrics) - 1 - prompt


def bucket_batch(batch: dict, generator: torch.Generator, max_seconds: float) -> dict:
    """``batch`` in shape buckets (a new dict): every sample cut to a random window of the latent
    bucket of the shortest one (SSL targets cut to the same time span) and the lyrics padded so that
    speaker + prompt + lyrics is a condition bucket long. Exact: nothing is padded along the latent
    time axis, and padded lyric tokens are masked out of every attention. The window starts are drawn
    from ``generator``."""
    lengths = batch["latent_mask"].sum(dim=1, dtype=torch.long).tolist()
    frames, lyric_tokens = bucket_shape(batch, max_seconds)
    out = dict(batch)
    if frames != batch["latents"].shape[-1] or min(lengths) != max(lengths):
        starts = [int(torch.randint(0, length - frames + 1, (), generator=generator)) for length in lengths]
        out["latents"] = torch.stack([x[..., s:s + frames] for x, s in zip(batch["latents"], starts)])
        out["latent_mask"] = batch["latent_mask"].new_ones(len(lengths), frames)
        for name, rate in (("mert", MERT_RATE), ("mhubert", MHUBERT_RATE)):
            if batch.get(name) is not None:
                out[name] = [None if x is None else _cut_ssl(x, s / LATENT_RATE, (s + frames) / LATENT_RATE, rate)
                             for x, s in zip(batch[name], starts)]
    pad = lyric_tokens - batch["lyric_ids"].shape[1]
    if pad:
        out["lyric_ids"] = torch.nn.functional.pad(batch["lyric_ids"], (0, pad))
        out["lyric_mask"] = torch.nn.functional.pad(batch["lyric_mask"], (0, pad))
    return out


def collate(samples: list[dict], speaker_dim: int = 512, dtype: torch.dtype | None = None) -> dict:
    """Samples (from ``make_sample``) -> the batch layout in this module's docstring.

    ``dtype`` of the float tensors; None keeps the samples' own (bfloat16 from the cache). Casting
    the SSL targets to float32 costs more than reading them, so only ask for it when needed.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    dtype = dtype or samples[0]["latents"].dtype
    size = len(samples)
    t_max = max(s["latents"].shape[-1] for s in samples)
    l_txt = max(s["text_states"].shape[0] for s in samples)
    d_txt = samples[0]["text_states"].shape[-1]
    l_lyr = max(s["lyric_ids"].shape[0] for s in samples)
    latents = torch.zeros(size, *samples[0]["latents"].shape[:-1], t_max, dtype=dtype)
    latent_mask = torch.zeros(size, t_max, dtype=dtype)
    text_states = torch.zeros(size, l_txt, d_txt, dtype=dtype)
    text_mask = torch.zeros(size, l_txt, dtype=torch.long)
    lyric_ids = torch.zeros(size, l_lyr, dtype=torch.long)
    lyric_mask = torch.zeros(size, l_lyr, dtype=torch.long)
    for i, s in enumerate(samples):
        t = s["latents"].shape[-1]
        latents[i, ..., :t] = s["latents"].to(dtype)
        latent_mask[i, :t] = 1
        n = s["text_states"].shape[0]
        text_states[i, :n] = s["text_states"].to(dtype)
        text_mask[i, :n] = s["text_mask"].long()
        n = s["lyric_ids"].shape[0]
        lyric_ids[i, :n] = s["lyric_ids"].long()
        lyric_mask[i, :n] = 1
    return {
        "keys": [s["key"] for s in samples],
        "latents": latents,
        "latent_mask": latent_mask,
        "text_states": text_states,
        "text_mask": text_mask,
        "speaker": torch.zeros(size, speaker_dim, dtype=dtype),
        "lyric_ids": lyric_ids,
        "lyric_mask": lyric_mask,
        "mert": [None if s.get("mert") is None else s["mert"].to(dtype) for s in samples],
        "mhubert": [None if s.get("mhubert") is None else s["mhubert"].to(dtype) for s in samples],
    }
