"""The decode and encode steps of the cache, as library functions the DVC stages call.

decode_songs: audio files → 48 kHz stereo float32 PCM (cache/pcm.py), once per audio content.
encode_stream: PCM or text → one feature stream's Zarr shards, only for songs whose content hash
or encoder fingerprint changed; songs that left the dataset leave the cache. Safe to kill: every
shard is written atomically and the next run picks up exactly what is missing. One process at a
time per stream (and encode worker): the stream's lock (cache/lock.py) is held from planning to the
last shard, and a second one stops with a line naming the first.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cache.pcm import has_pcm, prune_pcm, read_pcm, write_pcm
from cache.schema import SongFeatures
from cache.shards import CacheIndex, ShardSettings, ShardWriter, apply_plan, cleanup_temp, lock_stream, plan_update
from pipeline.audio import SAMPLE_RATE, load_audio, pad_to_min
from pipeline.config import ProjectConfig
from pipeline.errors import CheckpointError, DatasetError
from pipeline.fileio import disk_full_guard, write_text_atomic
from pipeline.features import AUDIO_STREAMS, STREAMS, StreamEncoder, stream_fingerprint


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path} not found: run `aceturbo ingest` (or `dvc repro`) first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def worker_slot(worker_index: int | None = None, num_workers_total: int | None = None) -> tuple[int, int]:
    """(index, total) of this encode worker: explicit values, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    total = num_workers_total or int(os.environ.get("WORLD_SIZE", "1"))
    index = worker_index if worker_index is not None else int(os.environ.get("RANK", "0"))
    if not 0 <= index < total:
        raise DatasetError(f"worker index {index} is outside 0..{total - 1}")
    return index, total


@dataclass
class StepSummary:
    stream: str
    encoded: int
    kept: int
    removed: int
    damaged: list[str] = field(default_factory=list)  # problems found in shards that were trusted

    def line(self) -> str:
        repaired = f", damaged shards replaced {len(self.damaged)}" if self.damaged else ""
        return (f"{self.stream}: encoded {self.encoded}, up to date {self.kept}, "
                f"removed {self.removed}{repaired}")


def decode_songs(project: ProjectConfig, progress: bool = True) -> StepSummary:
    """Decode every song whose audio is not decoded yet; drop PCM of songs that are gone."""
    # (kept as the file decodes: clips are padded to ingest.min_seconds by the encode steps)
    rows = read_rows(project.paths.audio_list)
    pcm_dir = project.paths.pcm
    todo = [r for r in rows if not has_pcm(pcm_dir, r["audio_sha256"])]
    data = Path(project.paths.data)
    for row in tqdm(todo, desc="decode", unit="song", disable=not progress):
        # Stored as decoded (not padded): padding is an encode setting, applied where the features are made.
        write_pcm(pcm_dir, row["audio_sha256"], load_audio(data / row["audio_path"]), SAMPLE_RATE)
    removed = prune_pcm(pcm_dir, {r["audio_sha256"] for r in rows})
    return StepSummary("decode", len(todo), len(rows) - len(todo), len(removed))


def write_fingerprints(project: ProjectConfig) -> dict[str, tuple[str, str]]:
    """Write each stream's encoder fingerprint (weights + settings + code version) to
    ``paths.fingerprint_file(stream)``, leaving a file alone when it already holds it, so that DVC
    reruns exactly the encode stages whose encoder changed. Returns {stream: (fingerprint, state)},
    state "changed", "unchanged" or "kept: <why>".

    Cheap on every run: weight files are re-hashed only when their (inode, size, mtime, ctime)
    changed (cache/fingerprint.py). A stream whose encoder weights are not on this machine (a cache
    fetched with `dvc pull`, trained from without the encoders) keeps its recorded fingerprint: the
    features are what they were, and its encode stage stays up to date as long as its inputs do.
    With no recorded fingerprint either, nothing could encode that stream here: the weights' error."""
    result = {}
    for stream in STREAMS:
        path = project.paths.fingerprint_file(stream)
        try:
            recorded = path.read_text(encoding="utf-8").strip()
        except OSError:
            recorded = ""
        try:
            value = stream_fingerprint(stream, project.models, project.encode, project.ingest.min_seconds,
                                       cache_dir=Path(project.paths.cache))
        except CheckpointError as exc:
            if not recorded:
                raise CheckpointError(f"{exc} ({path} records no fingerprint to keep either: "
                                      "`dvc pull` it with the features, or install the weights)") from exc
            result[stream] = (recorded, f"kept: encoder weights not on this machine ({exc})")
            continue
        if recorded != value:
            with disk_full_guard(path, len(value) + 1, kept="the previous fingerprint files are intact"):
                write_text_atomic(path, value + "\n")
        result[stream] = (value, "unchanged" if recorded == value else "changed")
    return result


def encode_stream(project: ProjectConfig, stream: str, worker: tuple[int, int] = (0, 1),
                  progress: bool = True, verify: bool = False) -> StepSummary:
    """Bring one feature stream of the cache up to date with the dataset.

    Every shard kept is checked cheaply (every field, offsets matching the stored shapes); with
    ``verify`` each kept song's checksum too, which reads and decompresses the whole stream. What
    fails is re-encoded.
    """
    if stream not in STREAMS:
        raise DatasetError(f"unknown stream {stream!r}; choose one of {', '.join(STREAMS)}")
    audio = stream in AUDIO_STREAMS
    rows = read_rows(project.paths.audio_list if audio else project.paths.text_list)
    wanted = {r["id"]: (r["audio_sha256"] if audio else r["content_hash"]) for r in rows}
    folder = project.paths.features
    fingerprint = stream_fingerprint(stream, project.models, project.encode, project.ingest.min_seconds,
                                     cache_dir=Path(project.paths.cache))
    settings = ShardSettings(float_storage=project.encode.storage_dtype)
    with lock_stream(folder, stream, worker) as lock:
        cleanup_temp(folder, streams=(stream,), lock=lock)  # on every run, also one with nothing to encode
        plan = plan_update(CacheIndex.open(folder, streams=(stream,), skip_unreadable=True), stream, wanted,
                           fingerprint, verify=verify)
        index, total = worker
        # Split by a stable hash of the key, not by position: workers that start at different times
        # (or a rerun of one worker) still agree on who encodes which song.
        mine = [k for k in plan.to_encode if zlib.crc32(k.encode("utf-8")) % total == index]
        by_id = {r["id"]: r for r in rows}
        if mine:
            encoder = StreamEncoder(stream, project.models, project.encode)
            with ShardWriter(folder, stream, fingerprint, settings, worker=worker, lock=lock) as writer:
                for key in tqdm(mine, desc=f"encode {stream}", unit="song", disable=not progress):
                    row = by_id[key]
                    if audio:
                        wav = pad_to_min(read_pcm(project.paths.pcm, row["audio_sha256"]), project.ingest.min_seconds)
                        tensor = encoder.audio(wav)
                        song = SongFeatures(key=key, **{stream: tensor})
                    else:
                        song = SongFeatures(key=key, **encoder.text(key, row["tags"], row.get("recaption") or {},
                                                                    row["lyrics"]))
                    writer.add(key, song, wanted[key])
        live = CacheIndex.open(folder, streams=(stream,), skip_unreadable=True).live(stream)
        removed = len(set(live) - set(wanted))
        if index == 0:  # one worker tidies up: stale songs and superseded copies leave the cache
            apply_plan(folder, stream, plan, settings, worker=worker, lock=lock)
    return StepSummary(stream, len(mine), len(wanted) - len(plan.to_encode), removed, list(plan.damaged))
