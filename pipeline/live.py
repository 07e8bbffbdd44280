"""The live batch source: the same batches as the cache, computed from audio and text every step.

This is what the original trainers do on every step (decode the audio, run the DCAE, MERT,
mHuBERT and UMT5). We keep it for `aceturbo train --live` and for the cached-vs-live comparison:
it calls the same feature functions as the encode stages (pipeline/features.py), rounds them to
the cache's storage dtype, and builds samples with the cache's own crop/variant/collate code and
the same per-sample random source. So for one song, seed and epoch it yields exactly the batch the
cached loader yields — only slower, and with every encoder in memory.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cache.collate import make_batch, make_sample, sample_rng
from cache.schema import SongFeatures
from pipeline.audio import load_audio, pad_to_min
from pipeline.config import ProjectConfig
from pipeline.features import AUDIO_STREAMS, StreamEncoder


def storage_round(tensor: torch.Tensor, storage_dtype: str) -> torch.Tensor:
    """What a float tensor becomes after a trip through the cache (16-bit storage, float32 back)."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[storage_dtype]
    return tensor.to(dtype).float()


@dataclass
class LiveEncoders:
    """All four stream encoders, loaded once (live mode keeps them all in memory)."""

    project: ProjectConfig
    streams: dict = field(default_factory=dict)

    def __post_init__(self):
        for stream in AUDIO_STREAMS + ("text",):
            self.streams[stream] = StreamEncoder(stream, self.project.models, self.project.encode)

    def song_features(self, key: str, audio_path: Path, tags: list[str], recaption: dict, lyrics: str) -> SongFeatures:
        wav = pad_to_min(load_audio(audio_path), self.project.ingest.min_seconds)
        storage = self.project.encode.storage_dtype
        values = {s: storage_round(self.streams[s].audio(wav), storage) for s in AUDIO_STREAMS}
        text = self.streams["text"].text(key, tags, recaption, lyrics)
        return SongFeatures(
            key=key,
            latents=values["latents"],
            mert=values["mert"],
            mhubert=values["mhubert"],
            text_states=storage_round(text["text_states"], storage),
            text_masks=text["text_masks"],
            lyric_ids=text["lyric_ids"],
        )


class LiveSource:
    """An endless, seeded stream of batches over the manifest's songs, encoded on the fly.

    Songs are shuffled per epoch; each sample's crop and prompt variant come from
    ``sample_rng(seed, epoch, key)``, as in the cached loader. ``state_dict`` / ``load_state_dict``
    give the same resume semantics ({"epoch", "batches_consumed"}).
    """

    def __init__(self, project: ProjectConfig, songs: list, batch_size: int = 1, max_seconds: float = 240.0,
                 seed: int = 0, speaker_dim: int = 512, dtype: torch.dtype | None = torch.bfloat16,
                 encoders: LiveEncoders | None = None):
        if not songs:
            from pipeline.errors import DatasetError

            raise DatasetError(f"no songs in {project.paths.manifest}: run `aceturbo ingest` first")
        self.project = project
        self.songs = sorted(songs, key=lambda s: s.id)  # pipeline.dataset.Song rows of the manifest
        self.batch_size, self.max_seconds, self.seed, self.speaker_dim = batch_size, max_seconds, seed, speaker_dim
        self.dtype = dtype  # batches in the cached loader's dtype (bfloat16 by default), so both match
        self.encoders = encoders or LiveEncoders(project)
        self.epoch, self.batches_consumed = 0, 0

    def features(self, song) -> SongFeatures:
        return self.encoders.song_features(song.id, song.audio_file(self.project.paths.data), song.tags,
                                           song.recaption or {}, song.lyrics)

    def sample(self, song, epoch: int) -> dict:
        return make_sample(self.features(song), sample_rng(self.seed, epoch, song.id), self.max_seconds)

    def _epoch_order(self, epoch: int) -> list:
        order = list(self.songs)
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order

    def __iter__(self):
        while True:
            order = self._epoch_order(self.epoch)
            batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            while self.batches_consumed < len(batches):
                group = batches[self.batches_consumed]
                rngs = [sample_rng(self.seed, self.epoch, s.id) for s in group]
                batch = make_batch([self.features(s) for s in group], rngs, self.max_seconds, self.speaker_dim,
                                   self.dtype)
                self.batches_consumed += 1
                yield batch
            self.epoch, self.batches_consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])


def make_live_source(project: ProjectConfig, config, speaker_dim: int = 512, keys: list[str] | None = None) -> LiveSource:
    """The `aceturbo train --live` batch source for a TrainConfig (same batches as the cache loader).
    The encoders run on encode.device; ``speaker_dim`` is the transformer's speaker_embedding_dim;
    ``keys``: the songs to train on (None: all of the manifest)."""
    from pipeline.dataset import read_manifest

    from pipeline import distributed

    rank = distributed.info()
    # Under DDP each rank encodes its own share of the songs (the cache loader splits by node too).
    everything = sorted(read_manifest(project.paths.manifest), key=lambda s: s.id)
    if keys is not None:
        wanted = set(keys)
        everything = [s for s in everything if s.id in wanted]
    songs = everything[rank.rank::rank.world_size]
    if not songs:
        from pipeline.errors import ConfigError

        raise ConfigError(f"{len(everything)} songs cannot feed {rank.world_size} ranks in --live mode: use fewer GPUs")
    return LiveSource(project, songs, batch_size=config.batch_size, max_seconds=config.max_seconds,
                      seed=config.seed, speaker_dim=speaker_dim)
