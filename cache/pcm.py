"""Decoded audio (48 kHz stereo float32) kept between the decode stage and the audio encoders.

One small Zarr v3 array per song, named by the sha256 of the source file, so a renamed song is not
decoded again and an edited one gets a new entry. float32 is kept exactly (zstd-compressed), so the
encoders see bit for bit what `pipeline.audio.load_audio` returns — the live source decodes the
same way, which keeps cached == live.

Each store is written under a ``.tmp-<name>-<pid>@<host>-*`` name, flushed (every file and folder)
and renamed into place, so a kill or power cut leaves the old state or the new store, never half a
store; temp stores are deleted once their writer is gone and they are 15 minutes old (cache/lock.py:
writer_gone).
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from cache.lock import temp_name, writer_gone
from pipeline.errors import CacheError
from pipeline.fileio import disk_full_guard, publish_dir, remove_dir_atomic

CHUNK = 48000 * 30  # 30 s of samples per inner chunk
SUFFIX = ".zarr"


def pcm_path(folder: str | Path, audio_sha256: str) -> Path:
    return Path(folder) / f"{audio_sha256[:32]}{SUFFIX}"


def has_pcm(folder: str | Path, audio_sha256: str) -> bool:
    return (pcm_path(folder, audio_sha256) / "zarr.json").exists()


def write_pcm(folder: str | Path, audio_sha256: str, wav: torch.Tensor, sample_rate: int, attrs: dict | None = None) -> Path:
    """Write ``wav`` [2, N] float32 atomically and durably (temp store, fsync, rename)."""
    final = pcm_path(folder, audio_sha256)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / temp_name(f".tmp-{final.stem}", SUFFIX)
    data = wav.detach().cpu().float().numpy()
    chunk = min(CHUNK, max(1, data.shape[1]))
    n_chunks = -(-data.shape[1] // chunk)
    kept = f"the decoded audio already in {final.parent} is intact"
    try:
        with disk_full_guard(tmp, data.nbytes, kept=kept):
            array = zarr.create_array(store=str(tmp), shape=data.shape, dtype="float32",
                                      chunks=(2, chunk), shards=(2, chunk * n_chunks),
                                      compressors=[ZstdCodec(level=3)], zarr_format=3)
            array[...] = data
            array.attrs.update({"sample_rate": sample_rate, "source_sha256": audio_sha256, **(attrs or {})})
            if not has_pcm(folder, audio_sha256):
                remove_dir_atomic(final)  # a store without its zarr.json is replaced
            try:
                publish_dir(tmp, final)
            except OSError as exc:
                # Another decode published the same audio meanwhile (the name is its content hash).
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not has_pcm(folder, audio_sha256):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_pcm(folder: str | Path, audio_sha256: str) -> torch.Tensor:
    path = pcm_path(folder, audio_sha256)
    try:
        array = zarr.open_array(str(path), mode="r")
        return torch.from_numpy(np.asarray(array[...], dtype=np.float32))
    except Exception as exc:
        raise CacheError(f"decoded audio {path} is missing or unreadable ({type(exc).__name__}): "
                         f"rerun `aceturbo decode` (or `dvc repro`)") from exc


def prune_pcm(folder: str | Path, keep_sha256: set[str]) -> list[Path]:
    """Remove decoded audio of songs no longer in the dataset, and temp stores whose writer is gone
    (never one another live decode is writing)."""
    folder = Path(folder)
    keep = {pcm_path(folder, s).name for s in keep_sha256}
    removed = []
    for entry in folder.glob("*" + SUFFIX) if folder.exists() else []:
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    for entry in folder.glob(".t*-*") if folder.exists() else []:
        if entry.name.startswith(".trash-") or (entry.name.startswith(".tmp-") and writer_gone(entry.name, _mtime(entry))):
            shutil.rmtree(entry, ignore_errors=True)
    return removed


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None  # removed meanwhile
