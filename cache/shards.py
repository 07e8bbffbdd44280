"""Zarr v3 shard stores of the feature cache: writer, index, reader, incremental-update planning.

On-disk layout (a local folder or any fsspec URL, e.g. ``s3://bucket/cache``, ``memory://c``)::

    <cache>/<stream>/shard-00000.zarr      one zarr v3 group per (stream, shard); streams are
    <cache>/<stream>/shard-00001.zarr      latents | mert | mhubert | text
    <cache>/<stream>/.tmp-*                a store being written (ignored, cleaned by the next writer)
    <cache>/.file_hashes.json              fingerprint memo (cache/fingerprint.py)

Inside a shard group, per field of the stream (schema.STREAMS):
    <field>          rows of all songs concatenated along axis 0 (schema.to_rows), uint16 holding
                     bfloat16 bits or float16 (floats), int8 / int32 (masks / ids); Blosc-zstd
                     compressed inner chunks of about 512 KiB inside ONE ShardingCodec shard, so
                     an array is two objects (zarr.json + c/0/...) instead of thousands of files.
    <field>_offsets  int64 [n_songs+1]: song i owns rows offsets[i]:offsets[i+1].
Group attrs ``aceturbo_cache``: schema_version, stream, fingerprint (cache/fingerprint.py),
generation (a newer shard's copy of a key supersedes an older one), float_storage, fields,
created, songs: [{key, content_hash (the song's input hash, from the caller), sha256 (of the
song's stored bytes, field by field; verified on read), shapes: {field: original shape}}].

Writes are atomic: a store is written under a ``.tmp-`` name and renamed into place (a directory
rename on local disks; on object stores the rename is a copy, and the checksums catch a torn one).
Removing a shard renames it to ``.trash-`` first, so a kill never leaves half a shard readable.

Incremental encoding (one stream at a time)::

    index = CacheIndex.open(folder)
    plan = plan_update(index, "mert", {key: content_hash, ...}, fp)
    with ShardWriter(folder, "mert", fp) as writer:
        for key in plan.to_encode:
            writer.add(key, features_of(key), wanted[key])
    apply_plan(folder, "mert", plan)      # drop or compact shards holding stale/deleted songs
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import fsspec
import numpy as np
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec, ZstdCodec

from cache.schema import (
    DEFAULT_FLOAT_STORAGE, FIELDS, FLOAT_STORAGES, LATENT_RATE, MERT_RATE, MHUBERT_RATE,
    SCHEMA_VERSION, STREAM_NAMES, STREAMS, SongFeatures, check_stream_arrays, from_rows, n_rows,
    to_rows,
)
from pipeline.errors import CacheError

DEFAULT_CACHE_FOLDER = "workspace/cache/features"
ATTRS_KEY = "aceturbo_cache"
SHARD_SUFFIX = ".zarr"
_SHARD_NUMBER = re.compile(r"^shard-(\d+)\.zarr$")
_FIX = "delete it and rerun `dvc repro`"


@dataclass(frozen=True)
class ShardSettings:
    """How shards are written. Defaults measured on 3-minute songs (see cache/bench.py)."""

    float_storage: str = DEFAULT_FLOAT_STORAGE  # "bfloat16" (bits as uint16, exact) or "float16"
    compressor: str = "blosc-zstd"  # "blosc-zstd" | "zstd" | "none"
    clevel: int = 5  # blosc-zstd 5 with byte shuffle: best ratio of those measured, fast to decode
    chunk_bytes: int = 512 << 10  # inner chunk: small enough for random reads, big enough to compress
    max_songs: int = 256  # a ShardWriter starts a new shard after this many songs...
    max_bytes: int = 256 << 20  # ...or this many raw stored bytes (bounds the writer's memory)

    def codec(self):
        if self.compressor == "blosc-zstd":
            # Byte shuffle puts the 16-bit floats' sign/exponent bytes together: ~30 % smaller.
            return [BloscCodec(cname="zstd", clevel=self.clevel, shuffle="shuffle")]
        if self.compressor == "zstd":
            return [ZstdCodec(level=self.clevel)]
        if self.compressor == "none":
            return None
        raise ValueError(f"unknown compressor {self.compressor!r} (blosc-zstd, zstd, none)")


# --------------------------------------------------------------------------------------------
# Where the cache lives: local folder or fsspec URL.


class CacheLocation:
    """A cache root on a local disk or behind an fsspec URL; hands out zarr stores for its shards."""

    def __init__(self, folder: str | os.PathLike, storage_options: dict | None = None):
        text = os.fspath(folder)
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(text, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.root = os.path.abspath(root)
            self.url = self.root
        else:
            self.root = root.rstrip("/")
            self.url = text.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url_of(self, *parts: str) -> str:
        return self.path(*parts) if self.local else "/".join([self.url, *parts])

    def store(self, *parts: str, read_only: bool):
        if self.local:
            return zarr.storage.LocalStore(self.path(*parts), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url_of(*parts), storage_options=self.storage_options or None,
                                                 read_only=read_only)

    def list_dir(self, *parts: str) -> list[str]:
        path = self.path(*parts)
        try:
            if not self.fs.isdir(path):
                return []
            names = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names})

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def rename(self, src: tuple[str, ...], dst: tuple[str, ...]) -> None:
        if self.local:
            os.rename(self.path(*src), self.path(*dst))  # atomic for a directory on one filesystem
        else:
            self.fs.mv(self.path(*src), self.path(*dst), recursive=True)

    def remove_tree(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.local:
            shutil.rmtree(path, ignore_errors=True)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def bytes_under(self, *parts: str) -> int:
        path = self.path(*parts)
        if not self.fs.exists(path):
            return 0
        return int(self.fs.du(path, total=True))


# --------------------------------------------------------------------------------------------
# Index: what each stream's shards hold.


@dataclass
class SongEntry:
    key: str
    content_hash: str
    sha256: str
    shapes: dict[str, tuple[int, ...]]
    position: int  # index of the song inside its shard

    @property
    def seconds(self) -> float | None:
        for name, rate, axis in (("latents", LATENT_RATE, -1), ("mert", MERT_RATE, 0), ("mhubert", MHUBERT_RATE, 0)):
            if name in self.shapes:
                return self.shapes[name][axis] / rate
        return None


@dataclass
class ShardInfo:
    stream: str
    name: str
    url: str
    schema_version: int
    fingerprint: str
    generation: int
    float_storage: str
    fields: tuple[str, ...]
    songs: list[SongEntry]
    created: str = ""

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.songs]


class UpdatePlan(NamedTuple):
    """What an encode stage must do for one stream.

    to_encode: keys to (re)encode, in the order they were wanted.
    shards: shard name -> keys to keep; [] means drop the shard, a shorter list means compact it.
    """

    to_encode: list[str]
    shards: dict[str, list[str]]


def _read_attrs(location: CacheLocation, stream: str, name: str) -> ShardInfo:
    url = location.url_of(stream, name)
    try:
        group = zarr.open_group(location.store(stream, name, read_only=True), mode="r")
        meta = group.attrs.asdict().get(ATTRS_KEY)
    except Exception as exc:  # any zarr/IO failure: this shard cannot be trusted
        raise CacheError(f"cache shard {url} is unreadable ({type(exc).__name__}: {exc}): {_FIX}") from exc
    if not isinstance(meta, dict) or "songs" not in meta:
        raise CacheError(f"cache shard {url} has no aceturbo metadata: {_FIX}")
    songs = [
        SongEntry(key=s["key"], content_hash=s.get("content_hash", ""), sha256=s["sha256"],
                  shapes={f: tuple(v) for f, v in s["shapes"].items()}, position=i)
        for i, s in enumerate(meta["songs"])
    ]
    return ShardInfo(stream=stream, name=name, url=url, schema_version=int(meta.get("schema_version", -1)),
                     fingerprint=str(meta.get("fingerprint", "")), generation=int(meta.get("generation", 0)),
                     float_storage=str(meta.get("float_storage", DEFAULT_FLOAT_STORAGE)),
                     fields=tuple(meta.get("fields", STREAMS.get(stream, ()))), songs=songs,
                     created=str(meta.get("created", "")))


def _shard_sort_key(info: ShardInfo):
    match = _SHARD_NUMBER.match(info.name)
    return (info.generation, int(match.group(1)) if match else -1, info.name)


class CacheIndex:
    """The shards of every stream and the live copy of each song (newest generation wins).

    Picklable (DataLoader workers get a copy); open zarr handles are per process.
    """

    def __init__(self, location: CacheLocation, shards: dict[str, list[ShardInfo]]):
        self.location = location
        self.shards = shards
        self._live: dict[str, dict[str, tuple[ShardInfo, SongEntry]]] = {}
        self._readers: dict[tuple[str, str], ShardReader] = {}

    @classmethod
    def open(cls, folder: str | os.PathLike | CacheLocation, storage_options: dict | None = None,
             streams: tuple[str, ...] | None = None) -> "CacheIndex":
        location = folder if isinstance(folder, CacheLocation) else CacheLocation(folder, storage_options)
        shards: dict[str, list[ShardInfo]] = {}
        for stream in streams or STREAM_NAMES:
            names = [n for n in location.list_dir(stream) if n.endswith(SHARD_SUFFIX) and not n.startswith(".")]
            infos = [_read_attrs(location, stream, n) for n in names]
            if infos:
                shards[stream] = sorted(infos, key=_shard_sort_key)
        return cls(location, shards)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = {}  # zarr handles are reopened in each worker
        return state

    @property
    def url(self) -> str:
        return self.location.url

    def streams(self) -> list[str]:
        return [s for s in STREAM_NAMES if s in self.shards]

    def all_shards(self) -> list[ShardInfo]:
        return [info for stream in self.streams() for info in self.shards[stream]]

    def shard(self, stream: str, name: str) -> ShardInfo | None:
        return next((s for s in self.shards.get(stream, []) if s.name == name), None)

    def live(self, stream: str) -> dict[str, tuple[ShardInfo, SongEntry]]:
        """key -> (shard, entry) of the copy a reader uses."""
        if stream not in self._live:
            table: dict[str, tuple[ShardInfo, SongEntry]] = {}
            for info in self.shards.get(stream, []):  # sorted oldest first: later ones overwrite
                for entry in info.songs:
                    table[entry.key] = (info, entry)
            self._live[stream] = table
        return self._live[stream]

    def keys(self, stream: str | None = None) -> list[str]:
        if stream is not None:
            return sorted(self.live(stream))
        return sorted(set().union(*(self.live(s).keys() for s in self.streams())))

    def content_hashes(self, stream: str) -> dict[str, str]:
        return {k: e.content_hash for k, (_, e) in self.live(stream).items()}

    def fingerprints(self) -> dict[str, list[str]]:
        return {s: sorted({i.fingerprint for i in self.shards[s]}) for s in self.streams()}

    def seconds(self, key: str) -> float | None:
        for stream in ("latents", "mert", "mhubert"):
            hit = self.live(stream).get(key)
            if hit:
                return hit[1].seconds
        return None

    def reader(self, info: ShardInfo) -> "ShardReader":
        slot = (info.stream, info.name)
        if slot not in self._readers:
            self._readers[slot] = ShardReader(self.location, info)
        return self._readers[slot]

    def read_stream(self, stream: str, key: str, verify: bool = True) -> dict[str, torch.Tensor]:
        hit = self.live(stream).get(key)
        if hit is None:
            raise CacheError(f"song {key!r} has no {stream} features in {self.url}: rerun `dvc repro`")
        return self.reader(hit[0]).read(hit[1], verify=verify)

    def read_song(self, key: str, streams: tuple[str, ...] | list[str] | None = None,
                  verify: bool = True) -> SongFeatures:
        """Join the song's streams (all present ones by default) into SongFeatures."""
        values: dict[str, torch.Tensor] = {}
        for stream in streams or self.streams():
            values.update(self.read_stream(stream, key, verify=verify))
        return SongFeatures(key=key, **values)


def read_song(folder, key: str, streams=None, storage_options: dict | None = None) -> SongFeatures:
    """One-off read (tools, tests); loops should keep a CacheIndex and call its read_song."""
    return CacheIndex.open(folder, storage_options).read_song(key, streams)


class ShardReader:
    """Reads songs out of one shard store; offsets are loaded once, zarr reads only the chunks needed."""

    def __init__(self, location: CacheLocation, info: ShardInfo):
        self.info = info
        self._location = location
        self._arrays: dict[str, zarr.Array] | None = None
        self._offsets: dict[str, np.ndarray] = {}

    def _open(self) -> dict[str, zarr.Array]:
        if self._arrays is None:
            try:
                group = zarr.open_group(self._location.store(self.info.stream, self.info.name, read_only=True), mode="r")
                arrays = {f: group[f] for f in self.info.fields}
                self._offsets = {f: np.asarray(group[f"{f}_offsets"][:], dtype=np.int64) for f in self.info.fields}
            except Exception as exc:
                raise CacheError(f"cache shard {self.info.url} is unreadable ({type(exc).__name__}: {exc}): "
                                 f"{_FIX}") from exc
            self._arrays = arrays
        return self._arrays

    def read_rows(self, entry: SongEntry, verify: bool = True) -> dict[str, np.ndarray]:
        """The song's stored rows, checked against the sha256 written with them."""
        arrays = self._open()
        rows: dict[str, np.ndarray] = {}
        try:
            for name in self.info.fields:
                offsets = self._offsets[name]
                rows[name] = np.asarray(arrays[name][int(offsets[entry.position]):int(offsets[entry.position + 1])])
        except CacheError:
            raise
        except Exception as exc:
            raise CacheError(f"cache shard {self.info.url} is corrupt (reading {entry.key!r} failed: "
                             f"{type(exc).__name__}: {exc}): {_FIX}") from exc
        if verify and _rows_sha256(rows, self.info.fields) != entry.sha256:
            raise CacheError(f"cache shard {self.info.url} is corrupt (song {entry.key!r} fails its checksum): {_FIX}")
        return rows

    def read(self, entry: SongEntry, verify: bool = True) -> dict[str, torch.Tensor]:
        rows = self.read_rows(entry, verify=verify)
        return {name: from_rows(FIELDS[name], rows[name], entry.shapes[name], self.info.float_storage)
                for name in self.info.fields}


# --------------------------------------------------------------------------------------------
# Writing.


@dataclass
class _PendingSong:
    key: str
    content_hash: str
    rows: dict[str, np.ndarray]
    shapes: dict[str, list[int]]
    sha256: str

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows.values())


def _rows_sha256(rows: Mapping[str, np.ndarray], fields: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in fields:
        digest.update(np.ascontiguousarray(rows[name]).data)
    return digest.hexdigest()


def _pending(stream: str, key: str, song, content_hash: str, float_storage: str) -> _PendingSong:
    arrays = song.stream_arrays(stream) if isinstance(song, SongFeatures) else dict(song)
    check_stream_arrays(stream, key, arrays)
    fields = STREAMS[stream]
    rows = {n: to_rows(FIELDS[n], arrays[n], float_storage) for n in fields}
    shapes = {n: [int(d) for d in arrays[n].shape] for n in fields}
    return _PendingSong(key, str(content_hash), rows, shapes, _rows_sha256(rows, fields))


def _write_store(location: CacheLocation, stream: str, name: str, songs: list[_PendingSong],
                 fingerprint: str, generation: int, settings: ShardSettings) -> str:
    """Write a complete shard under a temp name, then rename it to ``name`` (replacing one there)."""
    if settings.float_storage not in FLOAT_STORAGES:
        raise ValueError(f"float_storage must be one of {FLOAT_STORAGES}, got {settings.float_storage!r}")
    keys = [s.key for s in songs]
    if not keys:
        raise ValueError("a shard needs at least one song")
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys in one shard: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    tmp = f".tmp-{name[:-len(SHARD_SUFFIX)]}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
    try:
        group = zarr.open_group(location.store(stream, tmp, read_only=False), mode="w", zarr_format=3)
        for field_name in STREAMS[stream]:
            spec = FIELDS[field_name]
            dtype = spec.storage_dtype(settings.float_storage)
            parts = [s.rows[field_name] for s in songs]
            tail = parts[0].shape[1:] if parts else ()
            for song, part in zip(songs, parts):
                if part.shape[1:] != tail:
                    raise ValueError(f"song {song.key!r}: {field_name} rows {part.shape[1:]} differ from "
                                     f"{tail} of the other songs in this shard")
            data = np.concatenate(parts) if parts else np.zeros((0,), dtype)
            row_bytes = dtype.itemsize * int(np.prod(tail, dtype=np.int64))
            chunk_rows = max(1, min(settings.chunk_bytes // max(row_bytes, 1), len(data)))
            shard_rows = chunk_rows * max(1, math.ceil(len(data) / chunk_rows))  # chunks must tile the shard
            array = group.create_array(field_name, shape=data.shape, dtype=dtype, chunks=(chunk_rows, *tail),
                                       shards=(shard_rows, *tail), compressors=settings.codec(), fill_value=0)
            if data.size:
                array[...] = data
            offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
            group.create_array(f"{field_name}_offsets", data=offsets, chunks=(len(offsets),))
        # Metadata last: a store is only meaningful once its data is complete.
        group.attrs[ATTRS_KEY] = {
            "schema_version": SCHEMA_VERSION,
            "stream": stream,
            "fingerprint": fingerprint,
            "generation": int(generation),
            "float_storage": settings.float_storage,
            "fields": list(STREAMS[stream]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "songs": [{"key": s.key, "content_hash": s.content_hash, "sha256": s.sha256, "shapes": s.shapes}
                      for s in songs],
        }
        if location.exists(stream, name):
            _remove_shard(location, stream, name)
        location.rename((stream, tmp), (stream, name))
    except BaseException:
        location.remove_tree(stream, tmp)
        raise
    return name


def _remove_shard(location: CacheLocation, stream: str, name: str) -> None:
    trash = f".trash-{name[:-len(SHARD_SUFFIX)]}-{uuid.uuid4().hex[:8]}"
    location.rename((stream, name), (stream, trash))  # one atomic step takes it out of the cache
    location.remove_tree(stream, trash)


def _next_shard_name(location: CacheLocation, stream: str, worker: tuple[int, int] = (0, 1)) -> str:
    """The next free shard number; with N parallel workers, worker i only takes numbers ≡ i (mod N),
    so workers never pick the same name."""
    index, total = worker
    numbers = [int(m.group(1)) for n in location.list_dir(stream) if (m := _SHARD_NUMBER.match(n))]
    number = (max(numbers) + 1) if numbers else 0
    number += (index - number) % total
    return f"shard-{number:05d}{SHARD_SUFFIX}"


def _next_generation(location: CacheLocation, stream: str) -> int:
    infos = CacheIndex.open(location, streams=(stream,)).shards.get(stream, [])
    return 1 + max((i.generation for i in infos), default=0)


_TEMP_NUMBER = re.compile(r"^\.(?:tmp|trash)-shard-(\d+)-")


def cleanup_temp(folder, storage_options: dict | None = None, streams: tuple[str, ...] | None = None,
                 worker: tuple[int, int] = (0, 1)) -> list[str]:
    """Remove stores left by killed writers/removals. With N parallel workers, worker i removes only
    the temp stores of its own shard numbers (≡ i mod N), never a store another worker is writing."""
    location = folder if isinstance(folder, CacheLocation) else CacheLocation(folder, storage_options)
    index, total = worker
    removed = []
    for stream in streams or STREAM_NAMES:
        for name in location.list_dir(stream):
            match = _TEMP_NUMBER.match(name)
            if total > 1 and (match is None or int(match.group(1)) % total != index):
                continue
            if name.startswith((".tmp-", ".trash-")):
                location.remove_tree(stream, name)
                removed.append(f"{stream}/{name}")
    return removed


def write_shard(folder, stream: str, shard_name: str | None, songs: Mapping[str, object], fingerprint: str,
                content_hashes: Mapping[str, str], settings: ShardSettings | None = None,
                storage_options: dict | None = None) -> str:
    """Write ``songs`` (key -> SongFeatures or {field: tensor}) as one shard of ``stream``; returns its name.

    ``shard_name`` None picks the next free ``shard-NNNNN.zarr``; an existing name is replaced.
    """
    settings = settings or ShardSettings()
    location = CacheLocation(folder, storage_options)
    missing = [k for k in songs if k not in content_hashes]
    if missing:
        raise ValueError(f"content_hashes lacks {missing[:5]}")
    pending = [_pending(stream, k, v, content_hashes[k], settings.float_storage) for k, v in songs.items()]
    name = shard_name or _next_shard_name(location, stream)
    if not name.endswith(SHARD_SUFFIX):
        name += SHARD_SUFFIX
    return _write_store(location, stream, name, pending, fingerprint, _next_generation(location, stream), settings)


class ShardWriter:
    """Buffers songs of one stream and writes them as shards of bounded size (one writer per stream).

    Songs added before an exception are still written on exit (each shard atomically); songs never
    added simply stay in the next plan's ``to_encode``.
    """

    def __init__(self, folder, stream: str, fingerprint: str, settings: ShardSettings | None = None,
                 storage_options: dict | None = None, worker: tuple[int, int] = (0, 1)):
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}; streams are {', '.join(STREAM_NAMES)}")
        self.settings = settings or ShardSettings()
        self.location = CacheLocation(folder, storage_options)
        self.stream = stream
        self.fingerprint = fingerprint
        self.worker = worker  # (index, total) when an encode step runs as N parallel workers
        cleanup_temp(self.location, streams=(stream,), worker=worker)
        self._generation = _next_generation(self.location, stream)
        self._buffer: list[_PendingSong] = []
        self._seen: set[str] = set()
        self.written: list[str] = []

    def add(self, key: str, song, content_hash: str) -> None:
        if key in self._seen:
            raise ValueError(f"song {key!r} added twice to the {self.stream} writer")
        self._seen.add(key)
        self._buffer.append(_pending(self.stream, key, song, content_hash, self.settings.float_storage))
        if (len(self._buffer) >= self.settings.max_songs
                or sum(s.nbytes for s in self._buffer) >= self.settings.max_bytes):
            self.flush()

    def flush(self) -> str | None:
        if not self._buffer:
            return None
        name = _write_store(self.location, self.stream, _next_shard_name(self.location, self.stream, self.worker),
                            self._buffer, self.fingerprint, self._generation, self.settings)
        self._generation += 1
        self._buffer = []
        self.written.append(name)
        return name

    def close(self) -> list[str]:
        self.flush()
        return self.written

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or issubclass(exc_type, Exception):
            self.flush()
        else:
            self._buffer = []  # KeyboardInterrupt / SystemExit: stop quickly


# --------------------------------------------------------------------------------------------
# Incremental updates.


def plan_update(index: CacheIndex, stream: str, wanted: Mapping[str, str], fingerprint: str) -> UpdatePlan:
    """Which songs of ``stream`` to (re)encode, and which shards to drop or compact.

    A cached song is fresh when its live copy has the wanted content hash, this fingerprint and the
    current schema. Everything else in the stream (deleted songs, changed songs, other encoders,
    superseded copies) is stale and leaves the cache through ``apply_plan``.
    """
    live = index.live(stream)
    fresh = set()
    for key, (info, entry) in live.items():
        if (key in wanted and entry.content_hash == wanted[key] and info.fingerprint == fingerprint
                and info.schema_version == SCHEMA_VERSION):
            fresh.add(key)
    to_encode = [k for k in wanted if k not in fresh]
    shards: dict[str, list[str]] = {}
    for info in index.shards.get(stream, []):
        keep = [s.key for s in info.songs if s.key in fresh and live[s.key][0] is info]
        if len(keep) < len(info.songs):
            shards[info.name] = keep
    return UpdatePlan(to_encode, shards)


def apply_plan(folder, stream: str, plan: UpdatePlan, settings: ShardSettings | None = None,
               storage_options: dict | None = None, worker: tuple[int, int] = (0, 1)) -> None:
    """Drop the plan's empty shards and rewrite the others with only their kept songs.

    The kept songs' stored bytes are copied as they are (verified on the way); each rewrite is a new
    shard written before the old one is removed, so a kill at any point leaves a valid cache.
    """
    location = folder if isinstance(folder, CacheLocation) else CacheLocation(folder, storage_options)
    index = CacheIndex.open(location, streams=(stream,))
    generation = 1 + max((i.generation for i in index.shards.get(stream, [])), default=0)
    for name, keep in plan.shards.items():
        info = index.shard(stream, name)
        if info is None:
            continue
        if keep:
            reader = index.reader(info)
            copy_settings = dataclasses.replace(settings or ShardSettings(), float_storage=info.float_storage)
            wanted = set(keep)
            pending = []
            for entry in info.songs:
                if entry.key in wanted:
                    rows = reader.read_rows(entry)
                    pending.append(_PendingSong(entry.key, entry.content_hash, rows,
                                                {f: list(s) for f, s in entry.shapes.items()}, entry.sha256))
            # worker: the compacted shard takes one of this worker's own numbers, never a name
            # another parallel worker may be writing
            _write_store(location, stream, _next_shard_name(location, stream, worker), pending, info.fingerprint,
                         generation, copy_settings)
            generation += 1
        _remove_shard(location, stream, name)


def remove_songs(folder, stream: str, keys, storage_options: dict | None = None) -> None:
    """Take ``keys`` out of ``stream`` (compacting the shards that held them)."""
    location = CacheLocation(folder, storage_options)
    index = CacheIndex.open(location, streams=(stream,))
    gone = set(keys)
    shards = {i.name: [k for k in i.keys if k not in gone] for i in index.shards.get(stream, [])
              if gone.intersection(i.keys)}
    apply_plan(location, stream, UpdatePlan([], shards))
