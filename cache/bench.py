"""Cache size and loader throughput measurements (the `aceturbo bench` command calls these).

No thresholds here: the functions return numbers, the caller decides what they mean. Synthetic
songs have the real shapes and rates (3 minutes: latents [8,16,1938], MERT [13500,1024], mHuBERT
[9000,768], 8 prompt variants of [64,768]); "smooth" noise (a moving average along time, per-channel
offsets and scales) stands in for real features, "white" noise is the worst case for compression.

    python -m cache.bench [FOLDER]   # writes 4 synthetic songs per kind, prints MB/min and samples/s
"""
from __future__ import annotations

import json
import sys
import tempfile
import time

import numpy as np
import torch

from cache.loader import LoaderSettings, make_loader
from cache.schema import LATENT_RATE, MERT_RATE, MHUBERT_RATE, STREAMS, SongFeatures
from cache.shards import CacheIndex, CacheLocation, ShardSettings, write_shard

MB = 1e6  # reported sizes are decimal megabytes


def _noise(rng: np.random.Generator, frames: int, dim: int, kind: str, window: int = 8) -> torch.Tensor:
    white = rng.standard_normal((frames + window, dim), dtype=np.float32)
    if kind == "white":
        return torch.from_numpy(white[:frames])
    if kind != "smooth":
        raise ValueError(f"kind must be 'smooth' or 'white', got {kind!r}")
    summed = np.cumsum(white, axis=0)
    smooth = (summed[window:] - summed[:-window]) / np.sqrt(window)
    scale = rng.lognormal(0.0, 0.5, dim).astype(np.float32)
    offset = rng.normal(0.0, 0.5, dim).astype(np.float32)
    return torch.from_numpy(smooth * scale + offset)


def synthetic_song(key: str, seconds: float = 180.0, kind: str = "smooth", seed: int = 0, text_variants: int = 8,
                   text_len: int = 64, text_dim: int = 768, mert_dim: int = 1024, mhubert_dim: int = 768,
                   lyric_len: int = 600) -> SongFeatures:
    """A song with real feature shapes and frame rates, filled with noise."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * LATENT_RATE)
    latents = _noise(rng, frames, 128, kind).T.reshape(8, 16, frames).contiguous()
    lengths = rng.integers(text_len // 2, text_len + 1, text_variants)
    lengths[0] = text_len  # variants are padded to the longest one
    masks = torch.zeros(text_variants, text_len, dtype=torch.long)
    for k, n in enumerate(lengths):
        masks[k, :n] = 1
    states = _noise(rng, text_variants * text_len, text_dim, kind).reshape(text_variants, text_len, text_dim)
    return SongFeatures(
        key=key,
        latents=latents,
        mert=_noise(rng, int(seconds * MERT_RATE), mert_dim, kind),
        mhubert=_noise(rng, int(seconds * MHUBERT_RATE), mhubert_dim, kind),
        lyric_ids=torch.from_numpy(rng.integers(3, 6693, lyric_len)),
        text_states=states,
        text_masks=masks,
    )


def write_synthetic_cache(folder, n_songs: int = 4, seconds: float = 180.0, kind: str = "smooth",
                          settings: ShardSettings | None = None, storage_options: dict | None = None) -> list[str]:
    """Write ``n_songs`` synthetic songs into every stream of a cache (one shard per stream)."""
    songs = {f"{kind}-{i:04d}": synthetic_song(f"{kind}-{i:04d}", seconds, kind, seed=i) for i in range(n_songs)}
    hashes = {k: f"synthetic-{k}" for k in songs}
    for stream in STREAMS:
        write_shard(folder, stream, None, songs, f"synthetic-{stream}", hashes, settings, storage_options)
    return list(songs)


def measure_cache(folder, storage_options: dict | None = None) -> dict:
    """Songs, minutes of audio, bytes and MB per minute of audio per stream (and in total)."""
    location = CacheLocation(folder, storage_options)
    index = CacheIndex.open(location)
    keys = index.keys()
    seconds = sum(s for k in keys if (s := index.seconds(k)) is not None)
    minutes = seconds / 60.0
    sizes = {stream: location.bytes_under(stream) for stream in index.streams()}
    per_minute = {s: (b / MB / minutes if minutes else 0.0) for s, b in sizes.items()}
    per_minute["total"] = sum(per_minute.values())
    return {"url": location.url, "songs": len(keys), "minutes": minutes, "bytes": sizes,
            "bytes_total": sum(sizes.values()), "mb_per_minute": per_minute}


def verify_seconds(folder, storage_options: dict | None = None) -> dict[str, float]:
    """Seconds an encode step spends checking the shards it keeps, over all streams: "layout" (the
    default: metadata and offsets only) and "checksums" (``aceturbo encode --verify``: every song
    read, decompressed and hashed)."""
    from cache.shards import plan_update

    location = CacheLocation(folder, storage_options)
    result = {}
    for name, checksums in (("layout", False), ("checksums", True)):
        start = time.perf_counter()
        for stream in STREAMS:
            index = CacheIndex.open(location, streams=(stream,))  # fresh: nothing cached in memory
            wanted = index.content_hashes(stream)
            fingerprint = index.shards[stream][0].fingerprint
            plan_update(index, stream, wanted, fingerprint, verify=checksums)
        result[name] = time.perf_counter() - start
    return result


def loader_throughput(folder, settings: LoaderSettings | None = None, seconds: float = 5.0) -> float:
    """Samples per second the loader delivers, after its first batch (worker start-up excluded)."""
    settings = settings or LoaderSettings()
    loader = make_loader(folder, settings)
    batches = iter(loader)
    try:
        next(batches)
    except StopIteration:
        return 0.0
    count, start = 0, time.perf_counter()
    for batch in batches:
        count += len(batch["keys"])
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return count / elapsed if elapsed > 0 else 0.0


def main(argv: list[str]) -> None:
    root = argv[0] if argv else tempfile.mkdtemp(prefix="aceturbo-bench-")
    report = {}
    for kind in ("smooth", "white"):
        folder = f"{root}/{kind}"
        start = time.perf_counter()
        write_synthetic_cache(folder, n_songs=4, kind=kind)
        report[kind] = measure_cache(folder)
        report[kind]["write_seconds"] = time.perf_counter() - start
        report[kind]["check_seconds"] = verify_seconds(folder)
        for workers in (0, 2):
            # "store": every sample read, decompressed and verified from the shards (first epoch, or
            # a dataset larger than the memory cache); "memory": later epochs of a small dataset.
            for where, budget in (("store", 0), ("memory", LoaderSettings.memory_cache_mb)):
                settings = LoaderSettings(num_workers=workers, shuffle_buffer=4, songs_per_unit=1,
                                          memory_cache_mb=budget)
                report[kind][f"samples_per_s_{where}_workers{workers}"] = loader_throughput(folder, settings, seconds=8)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
