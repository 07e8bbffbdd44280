"""Decoded audio (48 kHz stereo float32) kept between the decode stage and the audio encoders.

One small Zarr v3 array per song, named by the sha256 of the source file, so a renamed song is not
decoded again and an edited one gets a new entry. float32 is kept exactly (zstd-compressed), so the
encoders see bit for bit what `pipeline.audio.load_audio` returns — the live source decodes the
same way, which keeps cached == live.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from pipeline.errors import CacheError

CHUNK = 48000 * 30  # 30 s of samples per inner chunk
SUFFIX = ".zarr"


def pcm_path(folder: str | Path, audio_sha256: str) -> Path:
    return Path(folder) / f"{audio_sha256[:32]}{SUFFIX}"


def has_pcm(folder: str | Path, audio_sha256: str) -> bool:
    return (pcm_path(folder, audio_sha256) / "zarr.json").exists()


def write_pcm(folder: str | Path, audio_sha256: str, wav: torch.Tensor, sample_rate: int, attrs: dict | None = None) -> Path:
    """Write ``wav`` [2, N] float32 atomically (temp store + rename)."""
    final = pcm_path(folder, audio_sha256)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.stem}-{uuid.uuid4().hex[:8]}{SUFFIX}"
    data = wav.detach().cpu().float().numpy()
    chunk = min(CHUNK, max(1, data.shape[1]))
    n_chunks = -(-data.shape[1] // chunk)
    try:
        array = zarr.create_array(store=str(tmp), shape=data.shape, dtype="float32",
                                  chunks=(2, chunk), shards=(2, chunk * n_chunks),
                                  compressors=[ZstdCodec(level=3)], zarr_format=3)
        array[...] = data
        array.attrs.update({"sample_rate": sample_rate, "source_sha256": audio_sha256, **(attrs or {})})
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
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
    """Remove decoded audio of songs no longer in the dataset, and temp stores of killed runs."""
    folder = Path(folder)
    keep = {pcm_path(folder, s).name for s in keep_sha256}
    removed = []
    for entry in folder.glob("*" + SUFFIX) if folder.exists() else []:
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    for entry in folder.glob(".tmp-*") if folder.exists() else []:
        shutil.rmtree(entry, ignore_errors=True)
    return removed
