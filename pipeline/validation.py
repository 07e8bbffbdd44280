"""The validation set and the best-checkpoint tracker: what "is the LoRA still getting better?" is measured on.

The training loss is noisy (a random σ, noise, crop and prompt variant every step) and cannot show
overfitting. The validation loss is the same loss (denoise + SSL, pipeline/objective.py) on a
*fixed* set: for each validation song one crop and one prompt variant, a grid of σ covering the
logit-normal timestep distribution (``sigma_grid``) and one noise draw per σ, all from ``val_seed``
and the song id, never from the training RNG. So the same LoRA always gets the same number, and a
resumed run draws the same curve. The loop evaluates it (pipeline/train.py: ``validation_loss``) in
eval mode, without CFG dropout and without gradients.

Which songs: the ones ``val_songs`` (ids or patterns; default ``val/*``, the data folder's ``val/``
subfolder) holds out of training. When none are held out the validation uses training songs: it then
measures fit, not generalisation, and falls as long as training goes on.
"""
from __future__ import annotations

import fnmatch
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from cache.collate import collate, make_sample, sample_rng
from cache.schema import SongFeatures
from pipeline.errors import ConfigError
from pipeline.objective import sigma_grid, training_sigmas

_WILDCARDS = set("*?[")
# The crop and prompt variant come from sample_rng(val_seed, VAL_EPOCH, key): an "epoch" the loader
# never draws, so the validation crop is not tied to any training epoch's.
VAL_EPOCH = -1


# ------------------------------------------------------------------ which songs
@dataclass
class SongSplit:
    train: list[str]
    val: list[str]  # the validation songs: held out, or (held_out False) training songs
    held_out: bool
    warnings: list[str] = field(default_factory=list)


def split_songs(keys: Iterable[str], patterns: Iterable[str], max_songs: int,
                content_hashes: Mapping[str, str] | None = None) -> SongSplit:
    """Split song ids into training and validation songs by ``patterns`` (ids or fnmatch patterns).

    A plain id that names no song is an error (a typo must not silently validate on training songs);
    a pattern that matches nothing is not (the default ``val/*`` with no val/ folder). Holding out
    every song is an error. A held-out song with the same audio (``content_hashes``) as a training
    song gives a warning: its validation loss would measure fit. The validation uses the first
    ``max_songs`` songs by id (0: none).
    """
    keys = sorted(keys)
    patterns = list(patterns)
    unknown = [p for p in patterns if not _WILDCARDS & set(p) and p not in keys]
    if unknown:
        raise ConfigError(f"val_songs names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not "
                          f"among the {len(keys)} songs (ids like {keys[0] if keys else 'album/song'}); fix the "
                          "id or drop it from val_songs.")
    held = [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    train = [k for k in keys if k not in set(held)]
    if held and not train:
        raise ConfigError(f"val_songs ({', '.join(patterns)}) holds out all {len(held)} songs: none are left to "
                          "train on; move some songs out of the data folder's val/ or narrow val_songs.")
    warnings = []
    if content_hashes:
        by_hash = {content_hashes[k]: k for k in train if content_hashes.get(k)}
        for k in held:
            twin = by_hash.get(content_hashes.get(k))
            if twin is not None:
                warnings.append(f"held-out song '{k}' has the same audio as training song '{twin}': its "
                                "validation loss measures fit, not generalisation; remove one of the two.")
    val = (held or train)[:max_songs]
    return SongSplit(train=train, val=val, held_out=bool(held), warnings=warnings)


# ------------------------------------------------------------------ the fixed set
@dataclass
class ValidationItem:
    """One song of the validation set: its crop/variant as a batch of one, and its σ grid."""

    key: str
    batch: dict  # cache/collate.py layout, B = 1, on the CPU
    sigmas: torch.Tensor  # [n]
    noise_seed: int

    def noise(self) -> torch.Tensor:
        """ε [n, 8, 16, T], fp32 on the CPU, the same every time (one draw per σ)."""
        shape = (self.sigmas.shape[0], *self.batch["latents"].shape[1:])
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.noise_seed), dtype=torch.float32)


@dataclass
class ValidationSet:
    items: list[ValidationItem]
    held_out: bool  # False: training songs (the loss measures fit)

    def describe(self) -> str:
        n = self.items[0].sigmas.shape[0] if self.items else 0
        songs = f"{len(self.items)} {'held-out' if self.held_out else 'training'} song(s) × {n} noise levels"
        return songs if self.held_out else songs + " (none held out: it measures fit, not generalisation)"


def build_validation_set(read_song: Callable[[str], SongFeatures], split: SongSplit, config: Any,
                         speaker_dim: int) -> ValidationSet | None:
    """The fixed validation set of a TrainConfig (None when validation is off or there are no songs).

    ``read_song(key)`` gives a song's features (the cache's or the live encoders'); each song is
    cropped to ``max_seconds`` and given a prompt variant as a training sample would be, from
    ``val_seed`` only."""
    if not config.val_max_songs or not split.val:
        return None
    sigmas = sigma_grid(config.val_sigmas, training_sigmas(shift=config.shift), config.logit_mean, config.logit_std)
    items = []
    for key in split.val:
        sample = make_sample(read_song(key), sample_rng(config.val_seed, VAL_EPOCH, key), config.max_seconds)
        items.append(ValidationItem(key=key, batch=collate([sample], speaker_dim), sigmas=sigmas,
                                    noise_seed=_seed(config.val_seed, "noise", key)))
    return ValidationSet(items=items, held_out=split.held_out)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") % 2**63


# ------------------------------------------------------------------ best and early stop
@dataclass
class BestTracker:
    """The lowest validation loss so far and how many validations have passed without beating it."""

    patience: int = 0  # early stop after this many validations without a new best (0: never)
    best_loss: float = math.inf
    best_step: int | None = None
    since_best: int = 0

    def update(self, step: int, loss: float | None) -> bool:
        """Count one validation; True when it is a new best."""
        if loss is not None and math.isfinite(loss) and loss < self.best_loss:
            self.best_loss, self.best_step, self.since_best = float(loss), step, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience

    @classmethod
    def from_records(cls, records: Iterable[dict], patience: int = 0) -> "BestTracker":
        """The tracker as it stood after these metrics.jsonl records (a resumed run continues it)."""
        tracker = cls(patience=patience)
        for r in records:
            if "val_loss" in r:
                tracker.update(int(r["step"]), r["val_loss"])
        return tracker


__all__ = ["SongSplit", "split_songs", "ValidationItem", "ValidationSet", "build_validation_set", "BestTracker",
           "VAL_EPOCH"]
