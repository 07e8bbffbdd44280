"""Streams training batches out of the feature cache with a WebDataset pipeline.

The pipeline has two halves so that order planning is free and the data is read once:

  plan (cheap, only keys)   wds.SimpleShardList(units, seed=f(seed, epoch))   same order everywhere
                            -> node split (rank::world_size)
                            -> expand a unit into its songs' keys
                            -> wds.shuffle(shuffle_buffer, rng=f(seed, epoch, rank))
                            -> batches of batch_size songs of one length bucket   epochs chained, resume skips here
  load (per worker)         wds.split_by_worker (by batch) -> wds.map(read + crop + collate)

A *unit* (what WebDataset calls a shard) is up to ``songs_per_unit`` consecutive songs of one
latents shard; small units keep nodes and workers busy even for the tens of songs of a LoRA set.
Workers split whole batches round-robin, which is exactly the order torch's DataLoader hands them
back in, so the batch sequence depends on (seed, epoch, rank, world_size) but not on num_workers,
and resuming at (epoch, batches_consumed) just skips keys in the plan: nothing is read to skip.
Crops and prompt variants come from sample_rng(seed, epoch, key). A batch of several songs holds
songs of one length bucket (cache.collate.latent_bucket, from the lengths in the index; the few left
over at the end of an epoch fill batches across neighbouring buckets), all cropped to the shortest
one's length, so no sample is padded.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
from collections import OrderedDict
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.utils.data
import webdataset as wds

from cache.collate import latent_bucket, make_batch, max_frames, sample_rng
from cache.fingerprint import check_cache
from cache.shards import CacheIndex
from cache.schema import STREAM_NAMES, SongFeatures
from pipeline.errors import AceTurboError, CacheError, ConfigError

_REQUIRED_STREAMS = ("latents", "text")  # the batch layout cannot be built without them


@dataclass
class LoaderSettings:
    batch_size: int = 1
    max_seconds: float = 240.0  # longer songs get a random window of this length (spec §6.4)
    shuffle_shards: bool = True
    shuffle_buffer: int = 64  # samples; 0 or 1 keeps the (shuffled) unit order
    seed: int = 0
    num_workers: int = 0
    speaker_dim: int = 512
    storage_options: dict | None = None
    streams: tuple[str, ...] = STREAM_NAMES  # drop "mert"/"mhubert" to train without SSL targets
    songs_per_unit: int = 8
    epochs: int | None = None  # None: repeat forever (the trainer stops at max_steps)
    drop_last: bool = False
    rank: int | None = None  # None: from RANK/WORLD_SIZE or torch.distributed (webdataset's rule)
    world_size: int | None = None
    # Float dtype of the batch. bfloat16 = exactly what the cache stores (training is bf16-true);
    # "float32" costs ~60 ms per 3-minute song in casts alone.
    dtype: str = "bfloat16"
    verify: bool = True  # check each song's sha256 when it is read from the store
    # Keep decoded songs in memory (per process, least recently used out): a handful of songs is
    # read, decompressed and verified once, and later epochs only crop. 0 turns it off.
    memory_cache_mb: int = 2048
    prefetch_factor: int = 2
    pin_memory: bool = False
    expected_fingerprints: dict[str, str] | None = field(default=None)


def _derived_seed(*parts) -> int:
    """A 64-bit seed from the parts; identical in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def _split_nodes(src, rank: int, world_size: int):
    """Same rule as wds.split_by_node, with the node fixed when the loader was made (spawned workers
    do not see the parent's torch.distributed state)."""
    yield from itertools.islice(src, rank, None, world_size)


def _expand_units(src, units: dict[str, list[str]], epoch: int):
    for shard in src:
        for key in units[shard["url"]]:
            yield {"__key__": key, "__url__": shard["url"], "epoch": epoch}


def _length_batches(src, batch_size: int, bucket_of: dict[str, int], partial: bool):
    """Batches of ``batch_size`` samples of one length bucket, each emitted as soon as it is full (in
    stream order). What is left at the end, longest bucket first, fills batches across neighbouring
    buckets, so an epoch has as many batches as plain batching would give."""
    waiting: dict[int, list[dict]] = {}
    for sample in src:
        group = waiting.setdefault(bucket_of[sample["__key__"]], [])
        group.append(sample)
        if len(group) == batch_size:
            yield waiting.pop(bucket_of[sample["__key__"]])
    rest = [sample for bucket in sorted(waiting, reverse=True) for sample in waiting[bucket]]
    for i in range(0, len(rest), batch_size):
        if len(rest[i:i + batch_size]) == batch_size or partial:
            yield rest[i:i + batch_size]


class _Plan:
    """Everything a worker needs; picklable (spawned workers get a copy)."""

    def __init__(self, index: CacheIndex, units: dict[str, list[str]], settings: LoaderSettings,
                 rank: int, world_size: int, frames: dict[str, int]):
        self.index = index
        self.units = units
        window = max_frames(settings.max_seconds)
        self.bucket_of = {key: latent_bucket(min(n, window), window) for key, n in frames.items()}
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.dtype = getattr(torch, settings.dtype)
        self._memo: OrderedDict[str, tuple[SongFeatures, int]] = OrderedDict()
        self._memo_bytes = 0

    def __getstate__(self):  # a worker starts with an empty memory cache of its own
        state = dict(self.__dict__)
        state["_memo"], state["_memo_bytes"] = OrderedDict(), 0
        return state

    def read_song(self, key: str) -> SongFeatures:
        """The song's features, from the memory cache or the store (LRU within memory_cache_mb)."""
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key][0]
        features = self.index.read_song(key, self.settings.streams, verify=self.settings.verify)
        size = sum(t.numel() * t.element_size() for t in vars(features).values() if isinstance(t, torch.Tensor))
        budget = self.settings.memory_cache_mb << 20
        if size <= budget:
            self._memo[key] = (features, size)
            self._memo_bytes += size
            while self._memo_bytes > budget:
                _, (_, dropped) = self._memo.popitem(last=False)
                self._memo_bytes -= dropped
        return features

    def epoch_batches(self, epoch: int) -> Iterator[list[str]]:
        s = self.settings
        stages = [
            wds.SimpleShardList(list(self.units), seed=_derived_seed(s.seed, epoch, "units") if s.shuffle_shards else None),
            functools.partial(_split_nodes, rank=self.rank, world_size=self.world_size),
            functools.partial(_expand_units, units=self.units, epoch=epoch),
        ]
        if s.shuffle_buffer > 1:
            rng = random.Random(_derived_seed(s.seed, epoch, "samples", self.rank))
            stages.append(wds.shuffle(s.shuffle_buffer, initial=s.shuffle_buffer, rng=rng))
        if s.batch_size == 1:
            stages.append(wds.batched(1, collation_fn=None))
        else:
            stages.append(functools.partial(_length_batches, batch_size=s.batch_size, bucket_of=self.bucket_of,
                                            partial=not s.drop_last))
        for batch in wds.DataPipeline(*stages):
            yield [sample["__key__"] for sample in batch]

    def global_batches(self, start_epoch: int, skip: int) -> Iterator[tuple[int, int, list[str]]]:
        """Batches of all epochs from (start_epoch, skip) on, as key lists (no data read)."""
        epoch = start_epoch
        while self.settings.epochs is None or epoch < self.settings.epochs:
            count = 0
            for i, keys in enumerate(self.epoch_batches(epoch)):
                count += 1
                if epoch == start_epoch and i < skip:
                    continue
                # A tuple, not a dict: wds.map would stamp a dict result with "__key__".
                yield (epoch, i, keys)
            if count == 0:
                return  # this node has no data: stop instead of spinning over empty epochs
            epoch += 1

    def load_batch(self, planned: tuple[int, int, list[str]]) -> dict:
        epoch, index, keys = planned
        s = self.settings
        batch = make_batch([self.read_song(key) for key in keys], [sample_rng(s.seed, epoch, key) for key in keys],
                           s.max_seconds, s.speaker_dim, self.dtype)
        batch["_epoch"], batch["_index"] = epoch, index
        return batch

    def load_batch_or_error(self, planned: tuple[int, int, list[str]]) -> dict:
        """load_batch, with a user error handed back as ``{"_error": exc}`` instead of raised: torch
        re-raises a worker's exception as a new one whose message is the worker's whole traceback,
        so CacheLoader raises the original one-line error itself."""
        try:
            return self.load_batch(planned)
        except AceTurboError as exc:
            return {"_error": exc}


class CacheDataset(torch.utils.data.IterableDataset):
    """Batches from (start_epoch, skip) on; each DataLoader worker loads every num_workers-th batch.

    Each batch also carries "_epoch" and "_index" (its position), which CacheLoader pops to keep
    its resume state.
    """

    def __init__(self, plan: _Plan, start_epoch: int = 0, skip: int = 0):
        super().__init__()
        self.plan = plan
        self.start_epoch = start_epoch
        self.skip = skip

    def __iter__(self):
        return iter(wds.DataPipeline(
            functools.partial(self.plan.global_batches, self.start_epoch, self.skip),
            wds.split_by_worker,
            wds.map(self.plan.load_batch_or_error),
        ))


class CacheLoader:
    """Iterable of batches (cache/collate.py layout) over epochs, resumable via state_dict()."""

    def __init__(self, folder, settings: LoaderSettings | None = None, keys: list[str] | None = None):
        self.settings = s = settings or LoaderSettings()
        if s.batch_size < 1 or s.songs_per_unit < 1 or s.num_workers < 0:
            raise ConfigError("loader: batch_size and songs_per_unit must be >= 1, num_workers >= 0")
        if s.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"loader dtype must be bfloat16, float16 or float32, got {s.dtype!r}")
        unknown = [x for x in s.streams if x not in STREAM_NAMES]
        if unknown or any(x not in s.streams for x in _REQUIRED_STREAMS):
            raise ConfigError(f"loader streams must include {_REQUIRED_STREAMS} and be among {STREAM_NAMES}, "
                              f"got {tuple(s.streams)}")
        index = check_cache(folder, s.expected_fingerprints, s.storage_options)
        self.index = index
        self.keys = self._select_keys(index, keys)
        rank, world_size = s.rank, s.world_size
        if rank is None or world_size is None:
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        if not 0 <= rank < world_size:
            raise ConfigError(f"loader: rank {rank} is not in 0..{world_size - 1}")
        # Units are what nodes split; with few songs and several nodes, smaller units so that every
        # node gets some (a LoRA dataset of a handful of songs on a few GPUs).
        per_unit = max(1, min(s.songs_per_unit, len(self.keys) // world_size))
        units: dict[str, list[str]] = {}
        latents_live = index.live("latents")
        chosen = set(self.keys)
        for info in index.shards["latents"]:
            mine = [e.key for e in info.songs if e.key in chosen and latents_live[e.key][0] is info]
            for j in range(0, len(mine), per_unit):
                units[f"{info.name}#{j // per_unit}"] = mine[j:j + per_unit]
        frames = {key: latents_live[key][1].shapes["latents"][-1] for key in self.keys}
        self._plan = _Plan(index, units, s, rank, world_size, frames)
        if self.batches_per_epoch(0) == 0:
            raise CacheError(f"node {rank} of {world_size} gets no songs from {index.url} ({len(self.keys)} songs in "
                             f"{len(units)} units): use fewer nodes than songs")
        self.epoch = 0
        self.batches_consumed = 0

    def _select_keys(self, index: CacheIndex, keys: list[str] | None) -> list[str]:
        for stream in _REQUIRED_STREAMS:
            if stream not in index.shards:
                raise CacheError(f"feature cache {index.url} has no {stream} stream: rerun `dvc repro`")
        available = index.keys("latents")
        if keys is not None:
            missing = sorted(set(keys) - set(available))
            if missing:
                raise CacheError(f"songs {missing[:5]} are not in the feature cache {index.url}: rerun `dvc repro`")
            available = [k for k in available if k in set(keys)]
        for stream in self.settings.streams:
            live = index.live(stream)
            lacking = [k for k in available if k not in live]
            if lacking:
                raise CacheError(f"songs {lacking[:5]} have latents but no {stream} features in {index.url}: "
                                 f"rerun `dvc repro`")
        if not available:
            raise CacheError(f"the feature cache {index.url} holds no songs to train on: rerun `dvc repro`")
        return available

    # -- planning -------------------------------------------------------------------------------

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return sum(1 for _ in self._plan.epoch_batches(epoch))

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])

    # -- iteration ------------------------------------------------------------------------------

    def dataset(self) -> CacheDataset:
        return CacheDataset(self._plan, self.epoch, self.batches_consumed)

    def __iter__(self) -> Iterator[dict]:
        s = self.settings
        source = self.dataset()
        if s.num_workers > 0:
            source = torch.utils.data.DataLoader(
                source, batch_size=None, num_workers=s.num_workers, prefetch_factor=s.prefetch_factor,
                pin_memory=s.pin_memory, persistent_workers=False)
        for batch in source:
            if "_error" in batch:
                raise batch["_error"]
            # Count a batch as consumed once it is handed over: a checkpoint taken after the step
            # that used it resumes with the next one.
            self.epoch, self.batches_consumed = batch.pop("_epoch"), batch.pop("_index") + 1
            yield batch


def make_loader(cache_folder_or_url, settings: LoaderSettings | None = None,
                keys: list[str] | None = None) -> CacheLoader:
    """Batches for training from a feature cache folder or fsspec URL (see CacheLoader)."""
    return CacheLoader(cache_folder_or_url, settings, keys)

