"""Encoder fingerprints: which weights, settings and code made a stream, and the trainer's check.

A stream's fingerprint is sha256 over (the bytes of the encoder's weight files, its settings as
sorted JSON, a code version string). The encode stage stores it in every shard it writes; the
trainer passes the fingerprints it expects to `check_cache`, so a cache made by other encoders or
settings is refused instead of silently training on mismatched features.

Hashing a multi-GB checkpoint takes seconds, so file digests are remembered in a small JSON file
that the caller keeps beside the cache, keyed by absolute path and trusted only while the file's
(device, inode, size, mtime_ns, ctime_ns) are unchanged. The ctime is the part no user tool can set:
any write, ``touch -d``, ``cp -p`` over it or replacement (new inode) changes it, so an edit that
keeps size and mtime is still seen. What could fool it: a filesystem that does not keep ctime or
inode numbers, or a change made with the clock set back to the old ctime to the nanosecond.

The `fingerprints` DVC stage (`aceturbo cache fingerprints`) writes each stream's fingerprint to
<cache>/fingerprints/<stream>.txt on every `dvc repro`, and each encode stage depends on its file:
that is how DVC sees encoder weights edited in place.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from pipeline.errors import CacheError, CheckpointError
from pipeline.fileio import disk_full_guard, write_json_atomic

HASH_CACHE_NAME = ".file_hashes.json"
_READ_BYTES = 4 << 20  # stream files in 4 MiB pieces: constant memory for any checkpoint size


def hash_cache_path(cache_folder: str | os.PathLike) -> Path:
    """Where the file-digest memo lives for a local cache folder.

    A relative folder is taken under DVC_ROOT when that holds it: a queued experiment (`dvc exp run
    --queue`) runs in a temporary copy of the repository that lacks the memo (it is no DVC output)
    and reads the model folders from the original repository (ModelsConfig.found_in), so it shares
    the original's memo instead of re-hashing GBs of weights. Entries are keyed by absolute path
    and file identity, and the memo is replaced atomically: parallel queue workers can only lose
    each other's new entries (a re-hash), never mix them up."""
    folder = Path(cache_folder)
    root = os.environ.get("DVC_ROOT")
    if root and not folder.is_absolute() and (Path(root) / folder).is_dir():
        folder = Path(root) / folder
    return folder / HASH_CACHE_NAME


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


# Files of a model folder that determine its outputs (weights, configs, remote code, vocabularies);
# READMEs, licences and the like are left out so editing them does not invalidate a cache.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".py", ".model", ".txt")


def _counts(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES and "README" not in path.name and "LICENSE" not in path.name


def _weight_files(weights: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(name used in the hash, path). Names are relative, so moving a checkpoint keeps its fingerprint."""
    items = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    found: list[tuple[str, Path]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file() and _counts(p)):
                found.append((sub.relative_to(path).as_posix(), sub))
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise CheckpointError(f"encoder weights {path} do not exist: download the checkpoint "
                                  f"or fix its path in params.yaml → models")
    return sorted(found, key=lambda item: item[0])


def _load_memo(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a broken memo only costs a re-hash


def _save_memo(path: Path, memo: dict) -> None:
    with disk_full_guard(path, kept="the feature cache is intact"):
        write_json_atomic(path, memo, indent=1, sort_keys=True)


def fingerprint(weights_path_or_files, settings: dict, code_version: str,
                hash_cache: str | os.PathLike | None = None) -> str:
    """sha256 hex of (weight files' bytes, settings, code version).

    ``weights_path_or_files``: a file, a folder (every file under it) or a list of those; None or
    [] for an encoder without weights (the lyric tokenizer hashes its vocab file instead).
    ``hash_cache``: JSON file remembering file digests by path and (dev, inode, size, mtime_ns,
    ctime_ns); None disables it.
    """
    files = _weight_files(weights_path_or_files) if weights_path_or_files else []
    memo_path = Path(hash_cache) if hash_cache is not None else None
    memo = _load_memo(memo_path)
    changed = False
    digests = []
    for name, path in files:
        stat = path.stat()
        entry_key = str(path.resolve())
        entry = memo.get(entry_key)
        identity = {"dev": stat.st_dev, "ino": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                    "ctime_ns": stat.st_ctime_ns}
        if entry and all(entry.get(k) == v for k, v in identity.items()):
            digest = entry["sha256"]
        else:
            digest = file_sha256(path)
            memo[entry_key] = {**identity, "sha256": digest}
            changed = True
        digests.append([name, digest])
    if changed and memo_path is not None:
        _save_memo(memo_path, memo)
    payload = json.dumps({"files": digests, "settings": settings, "code_version": code_version},
                         sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def check_cache(folder, expected: dict[str, str] | None = None, storage_options: dict | None = None):
    """Refuse a cache the trainer must not use; returns its CacheIndex when it is fine.

    Raises CacheError when the cache is empty, when a shard has another schema version, when a
    stream mixes fingerprints, or (with ``expected`` = {stream: fingerprint}) when a stream is
    missing or was made by other encoders/settings.
    """
    from cache.schema import SCHEMA_VERSION
    from cache.shards import CacheIndex

    index = CacheIndex.open(folder, storage_options=storage_options)
    if not index.all_shards():
        raise CacheError(f"feature cache {index.url} is empty or missing: run `dvc repro` "
                         f"(or `aceturbo encode`) first")
    fix = "cache made by other encoders/settings/schema: rerun `dvc repro`"
    for shard in index.all_shards():
        if shard.schema_version != SCHEMA_VERSION:
            raise CacheError(f"cache shard {shard.url} has schema version {shard.schema_version}, this "
                             f"code reads {SCHEMA_VERSION}: {fix} (or delete {index.url})")
    for stream in index.streams():
        prints = sorted({s.fingerprint for s in index.shards[stream]})
        if expected is None and len(prints) > 1:
            raise CacheError(f"stream {stream} of {index.url} mixes {len(prints)} encoder fingerprints: {fix}")
    for stream, want in (expected or {}).items():
        if stream not in index.shards:
            raise CacheError(f"feature cache {index.url} has no {stream} stream: rerun `dvc repro`")
        for shard in index.shards[stream]:
            if shard.fingerprint != want:
                raise CacheError(f"cache shard {shard.url} has {stream} fingerprint {shard.fingerprint[:12]}, "
                                 f"expected {want[:12]}: {fix}")
    return index
