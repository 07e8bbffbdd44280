"""Zarr v3 shard stores of the feature cache: writer, index, reader, incremental-update planning.

On-disk layout (a local folder or any fsspec URL, e.g. ``s3://bucket/cache``, ``memory://c``)::

    <cache>/<stream>/shard-00000.zarr      one zarr v3 group per (stream, shard); streams are
    <cache>/<stream>/shard-00001.zarr      latents | mert | mhubert | text
    <cache>/<stream>/.tmp-shard-w<slot>-<pid>@<host>-*   a store being written (ignored; deleted by
                                           the next holder of lock slot <slot>, cache/lock.py)
    <cache>/<stream>/.lock-<worker>        who is writing this stream now (cache/lock.py)
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

Writes are atomic and durable: a store is written under a ``.tmp-`` name, every file and folder of
it is flushed (fsync), and it is renamed into place, never over another writer's shard (a directory
rename on local disks; on object stores the rename is a copy, and the checks on read catch a torn
one). Removing a shard renames it to ``.trash-`` first, so a kill never leaves half a shard
readable. Every writer holds its stream's lock (cache/lock.py). Readers check each shard's layout
(every field, offsets matching the stored shapes) when they open it, and each song's checksum when
they read it; the encode step checks the layout of every shard it keeps, and with ``verify`` the
checksums too (docs/reliability.md).

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
import errno
import hashlib
import math
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
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
    row_tail, to_rows,
)
from cache.lock import StreamLock, temp_name, temp_slot, writer_gone
from pipeline.errors import CacheError
from pipeline.fileio import disk_full_guard, publish_dir, remove_dir_atomic

DEFAULT_CACHE_FOLDER = "workspace/cache/features"
ATTRS_KEY = "aceturbo_cache"
SHARD_SUFFIX = ".zarr"
_SHARD_NUMBER = re.compile(r"^shard-(\d+)\.zarr$")


class DamagedShardError(CacheError):
    """A shard (or one song in it) fails its checks; ``what`` says which and how, without the fix."""

    def __init__(self, url: str, stream: str, what: str):
        self.what = f"cache shard {url} {what}"
        self._parts = (url, stream, what)
        super().__init__(f"{self.what}: run `aceturbo encode {stream} --verify` to re-encode what is damaged "
                         f"(or delete the shard and rerun `dvc repro`)")

    def __reduce__(self):  # picklable (raised in DataLoader workers, re-raised in the main process)
        return type(self), self._parts


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

    def modified(self, *parts: str) -> float | None:
        """When a store was last changed (epoch seconds); None where the filesystem cannot say."""
        try:
            if self.local:
                return os.stat(self.path(*parts)).st_mtime
            return self.fs.modified(self.path(*parts, "zarr.json")).timestamp()
        except (OSError, NotImplementedError, ValueError, AttributeError):
            return None

    def publish(self, stream: str, tmp: str, name: str) -> bool:
        """Rename the finished store ``tmp`` to ``name``; False (nothing done) when ``name`` exists.

        Local: fsync of every file and folder of the store, an atomic rename that cannot replace a
        shard, then fsync of the stream folder (pipeline.fileio.publish_dir). Object stores: a copy
        after an existence check (best effort: two writers can still race there)."""
        if self.local:
            try:
                publish_dir(self.path(stream, tmp), self.path(stream, name))
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    return False
                raise
            return True
        if self.exists(stream, name):
            return False
        self.fs.mv(self.path(stream, tmp), self.path(stream, name), recursive=True)
        return True

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
    damaged: one line per problem found in shards the plan would otherwise have trusted.
    """

    to_encode: list[str]
    shards: dict[str, list[str]]
    damaged: tuple[str, ...] = ()


def _read_attrs(location: CacheLocation, stream: str, name: str) -> ShardInfo:
    url = location.url_of(stream, name)
    try:
        group = zarr.open_group(location.store(stream, name, read_only=True), mode="r")
        meta = group.attrs.asdict().get(ATTRS_KEY)
    except Exception as exc:  # any zarr/IO failure: this shard cannot be trusted
        raise DamagedShardError(url, stream, f"is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict) or "songs" not in meta:
        raise DamagedShardError(url, stream, "has no aceturbo metadata")
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
    ``unreadable``: {stream: {shard name: why}} of shards skipped by ``open(skip_unreadable=True)``.
    """

    def __init__(self, location: CacheLocation, shards: dict[str, list[ShardInfo]],
                 unreadable: dict[str, dict[str, str]] | None = None):
        self.location = location
        self.shards = shards
        self.unreadable = unreadable or {}
        self._live: dict[str, dict[str, tuple[ShardInfo, SongEntry]]] = {}
        self._readers: dict[tuple[str, str], ShardReader] = {}

    @classmethod
    def open(cls, folder: str | os.PathLike | CacheLocation, storage_options: dict | None = None,
             streams: tuple[str, ...] | None = None, skip_unreadable: bool = False) -> "CacheIndex":
        """Read every shard's metadata. An unreadable shard raises CacheError, or with
        ``skip_unreadable`` (the encode step, which replaces it) is left out and listed in ``unreadable``."""
        location = folder if isinstance(folder, CacheLocation) else CacheLocation(folder, storage_options)
        shards: dict[str, list[ShardInfo]] = {}
        unreadable: dict[str, dict[str, str]] = {}
        for stream in streams or STREAM_NAMES:
            infos = []
            for name in location.list_dir(stream):
                if not name.endswith(SHARD_SUFFIX) or name.startswith("."):
                    continue
                try:
                    infos.append(_read_attrs(location, stream, name))
                except DamagedShardError as exc:
                    if not skip_unreadable:
                        raise
                    unreadable.setdefault(stream, {})[name] = exc.what
            if infos:
                shards[stream] = sorted(infos, key=_shard_sort_key)
        return cls(location, shards, unreadable)

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
                present = set(group.array_keys())
                missing = [n for f in self.info.fields for n in (f, f"{f}_offsets") if n not in present]
                if missing:
                    raise DamagedShardError(self.info.url, self.info.stream, f"is incomplete (no {', '.join(missing)})")
                arrays = {f: group[f] for f in self.info.fields}
                offsets = {f: np.asarray(group[f"{f}_offsets"][:], dtype=np.int64) for f in self.info.fields}
            except DamagedShardError:
                raise
            except Exception as exc:
                raise DamagedShardError(self.info.url, self.info.stream,
                                        f"is unreadable ({type(exc).__name__}: {exc})") from exc
            problem = self._layout_problem(arrays, offsets)
            if problem:
                raise DamagedShardError(self.info.url, self.info.stream, f"is incomplete ({problem})")
            self._arrays, self._offsets = arrays, offsets
        return self._arrays

    def _layout_problem(self, arrays: dict[str, zarr.Array], offsets: dict[str, np.ndarray]) -> str | None:
        """Cheap checks from metadata and the small offsets arrays (no song data read): every field
        of the stream is there, with the dtype of its storage, and the offsets tile it exactly as
        the songs' recorded shapes say."""
        info = self.info
        missing = sorted(set(STREAMS[info.stream]) - set(info.fields))
        if missing:
            return f"no {', '.join(missing)}"
        for name in info.fields:
            spec, array, bounds = FIELDS[name], arrays[name], offsets[name]
            if array.dtype != spec.storage_dtype(info.float_storage):
                return f"{name} is {array.dtype}, expected {spec.storage_dtype(info.float_storage)}"
            if (bounds.shape != (len(info.songs) + 1,) or bounds[0] != 0 or (np.diff(bounds) < 0).any()
                    or bounds[-1] != array.shape[0]):
                return f"{name}_offsets do not match the {len(info.songs)} songs and {array.shape[0]} rows of {name}"
            for entry, start, stop in zip(info.songs, bounds[:-1], bounds[1:]):
                shape = entry.shapes.get(name)
                if (shape is None or n_rows(spec, shape) != stop - start
                        or row_tail(spec, shape) != tuple(array.shape[1:])):
                    return f"song {entry.key!r}: {name} rows do not match its recorded shape {shape}"
        return None

    def problems(self, keys, checksums: bool = False) -> dict[str, str]:
        """{key: why} for the songs among ``keys`` this shard cannot be trusted with: all of them when
        its layout is broken; with ``checksums`` also each song whose bytes fail their sha256 (this
        reads and decompresses the songs: about the cost of reading them for training)."""
        wanted = set(keys)
        try:
            self._open()
        except DamagedShardError as exc:
            return {key: exc.what for key in wanted}
        bad: dict[str, str] = {}
        if checksums:
            for entry in self.info.songs:
                if entry.key in wanted:
                    try:
                        self.read_rows(entry, verify=True)
                    except DamagedShardError as exc:
                        bad[entry.key] = exc.what
        return bad

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
            raise DamagedShardError(self.info.url, self.info.stream, f"is corrupt (reading {entry.key!r} failed: "
                                    f"{type(exc).__name__}: {exc})") from exc
        if verify and _rows_sha256(rows, self.info.fields) != entry.sha256:
            raise DamagedShardError(self.info.url, self.info.stream,
                                    f"is corrupt (song {entry.key!r} fails its checksum)")
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


def _write_store(location: CacheLocation, stream: str, name: str | None, songs: list[_PendingSong],
                 fingerprint: str, generation: int, settings: ShardSettings, lock: StreamLock,
                 worker: tuple[int, int] = (0, 1)) -> str:
    """Write a complete shard under a temp name and publish it; returns the name it got.

    ``lock``: the stream lock the caller holds; its slot goes into the temp name (cleanup_temp).
    ``name`` None (writers): the next free number of ``worker``, never replacing a shard another
    writer published meanwhile. A given ``name`` replaces the shard of that name (write_shard).
    """
    if settings.float_storage not in FLOAT_STORAGES:
        raise ValueError(f"float_storage must be one of {FLOAT_STORAGES}, got {settings.float_storage!r}")
    keys = [s.key for s in songs]
    if not keys:
        raise ValueError("a shard needs at least one song")
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys in one shard: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    tmp = temp_name(".tmp-shard", SHARD_SUFFIX, slot=lock.worker[0])  # names its writer and lock slot
    kept = f"the shards already in {location.url_of(stream)} are intact"
    with disk_full_guard(location.url_of(stream, tmp), sum(s.nbytes for s in songs), kept=kept):
        try:
            _fill_store(location, stream, tmp, songs, fingerprint, generation, settings)
            if name is not None:
                if location.exists(stream, name):
                    _remove_shard(location, stream, name)
                if not location.publish(stream, tmp, name):
                    raise CacheError(f"{location.url_of(stream, name)} was written by another process meanwhile")
                return name
            while True:  # loses only to a shard published since the name was chosen: take the next
                name = _next_shard_name(location, stream, worker)
                if location.publish(stream, tmp, name):
                    return name
        except BaseException as exc:
            vanished = isinstance(exc, FileNotFoundError) and not location.exists(stream, tmp)
            location.remove_tree(stream, tmp)
            if vanished:
                raise CacheError(f"the temp store {location.url_of(stream, tmp)} was deleted by another process "
                                 f"while this one wrote it; nothing was published: run this again") from None
            raise


def _fill_store(location: CacheLocation, stream: str, tmp: str, songs: list[_PendingSong], fingerprint: str,
                generation: int, settings: ShardSettings) -> None:
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


def _remove_shard(location: CacheLocation, stream: str, name: str) -> None:
    """Take a shard out in one atomic step (rename to a hidden ``.trash-`` name), then delete it."""
    if location.local:
        remove_dir_atomic(location.path(stream, name))
        return
    trash = f".trash-{name[:-len(SHARD_SUFFIX)]}-{uuid.uuid4().hex[:8]}"
    location.fs.mv(location.path(stream, name), location.path(stream, trash), recursive=True)
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
    infos = CacheIndex.open(location, streams=(stream,), skip_unreadable=True).shards.get(stream, [])
    return 1 + max((i.generation for i in infos), default=0)


def lock_stream(folder, stream: str, worker: tuple[int, int] = (0, 1),
                storage_options: dict | None = None) -> StreamLock:
    """The (not yet acquired) lock of ``stream``'s worker slot: ``with lock_stream(folder, "mert"): ...``."""
    location = folder if isinstance(folder, CacheLocation) else CacheLocation(folder, storage_options)
    return StreamLock(location, stream, worker)


@contextmanager
def _locked(location: CacheLocation, stream: str, lock: StreamLock | None, worker: tuple[int, int] = (0, 1)):
    """Run under ``lock`` (held by the caller for this stream) or under one taken just for this."""
    if lock is not None:
        if not lock.covers(location, stream):
            raise ValueError(f"the lock given is not a held lock of {location.url_of(stream)}")
        yield lock
        return
    with StreamLock(location, stream, worker) as own:
        yield own


def cleanup_temp(folder, storage_options: dict | None = None, streams: tuple[str, ...] | None = None,
                 lock: StreamLock | None = None) -> list[str]:
    """Remove stores left by killed writers and removals: every ``.trash-`` store; the ``.tmp-``
    stores of ``lock``'s slot (a held stream lock: their writer is gone, or it would hold it); other
    ``.tmp-`` stores once their writer looks gone and they are old (cache/lock.py: writer_gone)."""
    location = folder if isinstance(folder, CacheLocation) else CacheLocation(folder, storage_options)
    removed = []
    for stream in streams or STREAM_NAMES:
        mine = lock.worker[0] if lock is not None and lock.covers(location, stream) else None
        for name in location.list_dir(stream):
            if name.startswith(".trash-") or (name.startswith(".tmp-") and (
                    (mine is not None and temp_slot(name) == mine)
                    or writer_gone(name, location.modified(stream, name)))):
                location.remove_tree(stream, name)
                removed.append(f"{stream}/{name}")
    return removed


def write_shard(folder, stream: str, shard_name: str | None, songs: Mapping[str, object], fingerprint: str,
                content_hashes: Mapping[str, str], settings: ShardSettings | None = None,
                storage_options: dict | None = None, lock: StreamLock | None = None) -> str:
    """Write ``songs`` (key -> SongFeatures or {field: tensor}) as one shard of ``stream``; returns its name.

    ``shard_name`` None picks the next free ``shard-NNNNN.zarr``; an existing name is replaced.
    Holds the stream's lock while writing (``lock``: one the caller already holds).
    """
    settings = settings or ShardSettings()
    location = CacheLocation(folder, storage_options)
    missing = [k for k in songs if k not in content_hashes]
    if missing:
        raise ValueError(f"content_hashes lacks {missing[:5]}")
    pending = [_pending(stream, k, v, content_hashes[k], settings.float_storage) for k, v in songs.items()]
    name = shard_name and (shard_name if shard_name.endswith(SHARD_SUFFIX) else shard_name + SHARD_SUFFIX)
    with _locked(location, stream, lock) as held:
        return _write_store(location, stream, name, pending, fingerprint, _next_generation(location, stream),
                            settings, held)


class ShardWriter:
    """Buffers songs of one stream and writes them as shards of bounded size.

    Holds the stream's lock of its worker slot from creation to ``close()`` (or the end of its
    ``with`` block): ``lock`` is one the caller already holds, else the writer takes its own, and
    a second writer of the same slot gets a CacheError naming the first. Taking its own lock, it
    deletes the temp stores of writers that are gone (cleanup_temp); given a lock, that is the
    caller's part (pipeline.encoding does it on every run, once).

    Songs added before an exception are still written on exit (each shard atomically); songs never
    added, or whose shard failed to write, simply stay in the next plan's ``to_encode``.
    """

    def __init__(self, folder, stream: str, fingerprint: str, settings: ShardSettings | None = None,
                 storage_options: dict | None = None, worker: tuple[int, int] = (0, 1),
                 lock: StreamLock | None = None):
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}; streams are {', '.join(STREAM_NAMES)}")
        self.settings = settings or ShardSettings()
        self.location = CacheLocation(folder, storage_options)
        self.stream = stream
        self.fingerprint = fingerprint
        self.worker = worker  # (index, total) when an encode step runs as N parallel workers
        if lock is not None and not lock.covers(self.location, stream):
            raise ValueError(f"the lock given is not a held lock of {self.location.url_of(stream)}")
        self._own_lock = None if lock is not None else StreamLock(self.location, stream, worker).acquire()
        self._lock = lock or self._own_lock
        try:
            if self._own_lock is not None:
                cleanup_temp(self.location, streams=(stream,), lock=self._own_lock)
            self._generation = _next_generation(self.location, stream)
        except BaseException:
            self._release()
            raise
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
        songs, self._buffer = self._buffer, []  # a failed write is not retried: its songs get re-encoded
        name = _write_store(self.location, self.stream, None, songs, self.fingerprint, self._generation,
                            self.settings, self._lock, self.worker)
        self._generation += 1
        self.written.append(name)
        return name

    def _release(self) -> None:
        if self._own_lock is not None:
            self._own_lock.release()
            self._own_lock = None

    def close(self) -> list[str]:
        try:
            self.flush()
        finally:
            self._release()
        return self.written

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None or issubclass(exc_type, Exception):
                self.flush()
            else:
                self._buffer = []  # KeyboardInterrupt / SystemExit: stop quickly
        finally:
            self._release()


# --------------------------------------------------------------------------------------------
# Incremental updates.


def plan_update(index: CacheIndex, stream: str, wanted: Mapping[str, str], fingerprint: str,
                verify: bool = False) -> UpdatePlan:
    """Which songs of ``stream`` to (re)encode, and which shards to drop or compact.

    A cached song is fresh when its live copy has the wanted content hash, this fingerprint and the
    current schema, and its shard passes the checks on open (every field, offsets matching the
    recorded shapes; with ``verify`` also the song's checksum, which reads all its bytes). Everything
    else in the stream (deleted songs, changed songs, other encoders, superseded copies, damaged
    or unreadable shards) is stale and leaves the cache through ``apply_plan``.
    """
    live = index.live(stream)
    fresh = set()
    for key, (info, entry) in live.items():
        if (key in wanted and entry.content_hash == wanted[key] and info.fingerprint == fingerprint
                and info.schema_version == SCHEMA_VERSION):
            fresh.add(key)
    damaged: list[str] = []
    for info in index.shards.get(stream, []):
        trusted = [s.key for s in info.songs if s.key in fresh and live[s.key][0] is info]
        problems = index.reader(info).problems(trusted, checksums=verify) if trusted else {}
        fresh -= problems.keys()
        damaged.extend(dict.fromkeys(problems.values()))  # one line per distinct problem
    to_encode = [k for k in wanted if k not in fresh]
    shards: dict[str, list[str]] = {}
    for info in index.shards.get(stream, []):
        keep = [s.key for s in info.songs if s.key in fresh and live[s.key][0] is info]
        if len(keep) < len(info.songs):
            shards[info.name] = keep
    for name, why in index.unreadable.get(stream, {}).items():
        shards[name] = []
        damaged.append(why)
    return UpdatePlan(to_encode, shards, tuple(damaged))


def apply_plan(folder, stream: str, plan: UpdatePlan, settings: ShardSettings | None = None,
               storage_options: dict | None = None, worker: tuple[int, int] = (0, 1),
               lock: StreamLock | None = None) -> None:
    """Drop the plan's empty shards and rewrite the others with only their kept songs.

    The kept songs' stored bytes are copied as they are (verified on the way); each rewrite is a new
    shard written before the old one is removed, so a kill at any point leaves a valid cache.
    Holds the stream's lock (``lock``: one the caller already holds).
    """
    location = folder if isinstance(folder, CacheLocation) else CacheLocation(folder, storage_options)
    with _locked(location, stream, lock, worker) as held:
        index = CacheIndex.open(location, streams=(stream,), skip_unreadable=True)
        generation = 1 + max((i.generation for i in index.shards.get(stream, [])), default=0)
        for name, keep in plan.shards.items():
            info = index.shard(stream, name)
            if info is not None and keep:
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
                _write_store(location, stream, None, pending, info.fingerprint, generation, copy_settings, held,
                             worker)
                generation += 1
            if location.exists(stream, name):  # (an unreadable shard has no info: it goes too)
                _remove_shard(location, stream, name)


def remove_songs(folder, stream: str, keys, storage_options: dict | None = None) -> None:
    """Take ``keys`` out of ``stream`` (compacting the shards that held them)."""
    location = CacheLocation(folder, storage_options)
    with StreamLock(location, stream) as lock:
        index = CacheIndex.open(location, streams=(stream,))
        gone = set(keys)
        shards = {i.name: [k for k in i.keys if k not in gone] for i in index.shards.get(stream, [])
                  if gone.intersection(i.keys)}
        apply_plan(location, stream, UpdatePlan([], shards), lock=lock)
