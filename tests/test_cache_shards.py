"""Zarr shard writer/reader, incremental update planning, atomic writes, fingerprints and check_cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache import fingerprint as fp_mod
from cache.fingerprint import check_cache, fingerprint
from cache.lock import HOST
from cache.schema import SCHEMA_VERSION, STREAMS, SongFeatures
from cache.shards import (
    ATTRS_KEY, CacheIndex, ShardSettings, ShardWriter, apply_plan, cleanup_temp, plan_update, read_song,
    remove_songs, write_shard,
)
from pipeline.errors import CacheError, CheckpointError

REPO = Path(__file__).resolve().parents[1]


def make_song(key: str, frames: int = 40, seed: int = 0, k: int = 3) -> SongFeatures:
    g = torch.Generator().manual_seed(seed)
    masks = torch.ones(k, 7, dtype=torch.long)
    masks[1:, 5:] = 0  # variants shorter than the longest are padded
    return SongFeatures(
        key=key,
        latents=torch.randn(8, 16, frames, generator=g),
        mert=torch.randn(round(frames * 75 / 10.7666), 12, generator=g),
        mhubert=torch.randn(round(frames * 50 / 10.7666), 10, generator=g),
        lyric_ids=torch.randint(0, 6693, (5 + seed,), generator=g),
        text_states=torch.randn(k, 7, 6, generator=g),
        text_masks=masks,
    )


def write_all(folder, songs: dict[str, SongFeatures], prints=None, hashes=None, **kw):
    hashes = hashes or {k: f"h-{k}" for k in songs}
    for stream in STREAMS:
        write_shard(folder, stream, None, songs, (prints or {}).get(stream, f"fp-{stream}"), hashes, **kw)


@pytest.fixture
def songs():
    return {f"song{i}": make_song(f"song{i}", 30 + 5 * i, seed=i) for i in range(4)}


def assert_same(got: SongFeatures, want: SongFeatures, float_dtype=torch.bfloat16):
    for name in ("latents", "mert", "mhubert", "text_states"):
        expected = getattr(want, name).to(float_dtype)
        assert getattr(got, name).dtype == float_dtype
        assert torch.equal(getattr(got, name), expected), name  # bit-exact after the 16-bit cast
    assert torch.equal(got.lyric_ids, want.lyric_ids) and got.lyric_ids.dtype == torch.long
    assert torch.equal(got.text_masks, want.text_masks) and got.text_masks.dtype == torch.long


def test_roundtrip_local_bfloat16_layout_and_attrs(tmp_path, songs):
    write_all(tmp_path, songs)
    index = CacheIndex.open(tmp_path)
    assert index.streams() == ["latents", "mert", "mhubert", "text"]
    for key, song in songs.items():
        assert_same(index.read_song(key), song)
    shard = tmp_path / "mert" / "shard-00000.zarr"
    files = [p for p in shard.rglob("*") if p.is_file()]
    # group + (array + offsets) metadata and one sharded object each: a few files, not one per chunk
    assert len(files) <= 6, files
    meta = json.loads((shard / "zarr.json").read_text())["attributes"][ATTRS_KEY]
    assert meta["schema_version"] == SCHEMA_VERSION and meta["fingerprint"] == "fp-mert"
    assert meta["float_storage"] == "bfloat16"
    assert [s["key"] for s in meta["songs"]] == list(songs)
    assert meta["songs"][2]["content_hash"] == "h-song2" and len(meta["songs"][2]["sha256"]) == 64
    assert zarr.open_array(str(shard / "mert"), mode="r").dtype == np.uint16  # bf16 bits
    offsets = zarr.open_array(str(shard / "mert_offsets"), mode="r")[:]
    assert offsets.tolist() == np.cumsum([0] + [s.mert.shape[0] for s in songs.values()]).tolist()


def test_float16_storage_and_small_chunks(tmp_path, songs):
    settings = ShardSettings(float_storage="float16", chunk_bytes=1024, compressor="zstd", clevel=3)
    write_all(tmp_path, songs, settings=settings)
    got = read_song(tmp_path, "song3")
    assert_same(got, songs["song3"], torch.float16)


@pytest.mark.parametrize("url", ["memory://cachetest-{u}", "file://{tmp}"])
def test_fsspec_urls(tmp_path, songs, url):
    url = url.format(u=uuid.uuid4().hex[:6], tmp=tmp_path)
    write_all(url, songs)
    index = CacheIndex.open(url)
    assert index.keys() == sorted(songs)
    assert_same(index.read_song("song1"), songs["song1"])
    plan = plan_update(index, "latents", {"song1": "h-song1"}, "fp-latents")
    apply_plan(url, "latents", plan)
    assert CacheIndex.open(url).keys("latents") == ["song1"]


def test_checksum_mismatch_names_shard(tmp_path, songs):
    write_all(tmp_path, songs)
    array = zarr.open_array(str(tmp_path / "mhubert" / "shard-00000.zarr" / "mhubert"), mode="r+")
    array[3, 0] = array[3, 0] ^ 1  # one flipped bit of song0
    index = CacheIndex.open(tmp_path)
    index.read_song("song1")  # other songs are fine
    with pytest.raises(CacheError, match=r"mhubert/shard-00000\.zarr.*song0.*dvc repro"):
        index.read_song("song0")


def test_garbled_bytes_and_garbled_metadata(tmp_path, songs):
    write_all(tmp_path, songs)
    blob = next((tmp_path / "latents" / "shard-00000.zarr" / "latents" / "c").rglob("*"))
    while blob.is_dir():
        blob = next(blob.iterdir())
    data = bytearray(blob.read_bytes())
    data[20:60] = bytes(40)
    blob.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"latents/shard-00000\.zarr.*dvc repro"):
        CacheIndex.open(tmp_path).read_song("song0")
    (tmp_path / "text" / "shard-00000.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"text/shard-00000\.zarr is unreadable"):
        CacheIndex.open(tmp_path)


def test_plan_update_and_compaction(tmp_path, songs):
    write_all(tmp_path, songs)
    index = CacheIndex.open(tmp_path)
    same = {k: f"h-{k}" for k in songs}
    assert plan_update(index, "mert", same, "fp-mert") == ([], {}, ())
    wanted = dict(same)
    del wanted["song0"]  # deleted song
    wanted["song1"] = "new-hash"  # edited song
    wanted["song9"] = "h-song9"  # added song
    plan = plan_update(index, "mert", wanted, "fp-mert")
    assert plan.to_encode == ["song1", "song9"]
    assert plan.shards == {"shard-00000.zarr": ["song2", "song3"]}
    with ShardWriter(tmp_path, "mert", "fp-mert") as writer:
        writer.add("song1", make_song("song1", 50, seed=11), "new-hash")
        writer.add("song9", make_song("song9", 20, seed=9), "h-song9")
    apply_plan(tmp_path, "mert", plan)
    index = CacheIndex.open(tmp_path)
    assert index.content_hashes("mert") == wanted
    assert sorted(i.name for i in index.shards["mert"]) == ["shard-00001.zarr", "shard-00002.zarr"]
    assert index.read_stream("mert", "song1")["mert"].shape[0] == make_song("song1", 50, seed=11).mert.shape[0]
    assert torch.equal(index.read_stream("mert", "song2")["mert"], songs["song2"].mert.bfloat16())
    assert plan_update(index, "mert", wanted, "fp-mert") == ([], {}, ())
    # another encoder fingerprint makes every song stale and every shard droppable
    plan = plan_update(index, "mert", wanted, "fp-mert-v2")
    assert sorted(plan.to_encode) == sorted(wanted)
    assert all(keep == [] for keep in plan.shards.values())
    # the other streams were never touched
    assert index.keys("latents") == sorted(songs)


def test_newest_generation_wins_and_remove_songs(tmp_path, songs):
    write_shard(tmp_path, "latents", None, songs, "fp", {k: "old" for k in songs})
    newer = {"song2": make_song("song2", 12, seed=42)}
    write_shard(tmp_path, "latents", None, newer, "fp", {"song2": "new"})
    index = CacheIndex.open(tmp_path)
    assert index.content_hashes("latents")["song2"] == "new"
    assert index.read_stream("latents", "song2")["latents"].shape[-1] == 12
    plan = plan_update(index, "latents", {k: ("new" if k == "song2" else "old") for k in songs}, "fp")
    assert plan.to_encode == [] and plan.shards == {"shard-00000.zarr": ["song0", "song1", "song3"]}
    remove_songs(tmp_path, "latents", ["song0", "song2"])
    assert CacheIndex.open(tmp_path).keys("latents") == ["song1", "song3"]


def test_writer_rolls_over_and_replaces_named_shard(tmp_path):
    with ShardWriter(tmp_path, "latents", "fp", ShardSettings(max_songs=2)) as writer:
        for i in range(5):
            writer.add(f"k{i}", {"latents": torch.randn(8, 16, 10 + i)}, f"h{i}")
    assert writer.written == ["shard-00000.zarr", "shard-00001.zarr", "shard-00002.zarr"]
    assert len(CacheIndex.open(tmp_path).keys("latents")) == 5
    write_shard(tmp_path, "latents", "shard-00001", {"z": {"latents": torch.zeros(8, 16, 3)}}, "fp", {"z": "hz"})
    assert CacheIndex.open(tmp_path).keys("latents") == ["k0", "k1", "k4", "z"]
    with pytest.raises(ValueError, match="8,16,T"):
        write_shard(tmp_path, "latents", None, {"bad": {"latents": torch.zeros(4, 16, 3)}}, "fp", {"bad": "h"})


def test_writer_flushes_completed_songs_on_error_and_temp_is_ignored(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "latents", "fp") as writer:
            writer.add("a", {"latents": torch.randn(8, 16, 5)}, "ha")
            raise RuntimeError("encoder crashed on the next song")
    assert CacheIndex.open(tmp_path).keys("latents") == ["a"]
    # a store left by a killed writer: invisible to readers, removed by the next writer
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    leftover = tmp_path / "latents" / f".tmp-shard-w0-{int(dead.stdout)}@{HOST}-deadbeef.zarr"
    leftover.mkdir()
    (leftover / "zarr.json").write_text("{}")
    assert CacheIndex.open(tmp_path).keys("latents") == ["a"]
    ShardWriter(tmp_path, "latents", "fp").close()
    assert not leftover.exists()
    assert cleanup_temp(tmp_path) == []


def test_killed_writer_leaves_a_valid_cache(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from cache.shards import ShardWriter, ShardSettings
        i = 0
        with ShardWriter({str(tmp_path)!r}, "mert", "fp", ShardSettings(max_songs=3)) as w:
            while True:
                w.add(f"k{{i}}", {{"mert": torch.randn(3000, 256)}}, "h")
                i += 1
                if i == 6:
                    print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    index = CacheIndex.open(tmp_path)
    keys = index.keys("mert")
    assert len(keys) >= 6 and len(keys) % 3 == 0  # whole shards only
    for key in keys:
        index.read_stream("mert", key)  # every checksum holds
    ShardWriter(tmp_path, "mert", "fp").close()  # the next holder of slot 0 deletes the killed one's temp store
    assert [n for n in os.listdir(tmp_path / "mert") if n.startswith(".")] == [".lock-0"]


def test_check_cache(tmp_path, songs):
    with pytest.raises(CacheError, match="empty or missing"):
        check_cache(tmp_path)
    write_all(tmp_path, songs)
    expected = {s: f"fp-{s}" for s in STREAMS}
    assert check_cache(tmp_path, expected).keys() == sorted(songs)
    with pytest.raises(CacheError, match=r"mert/shard-00000\.zarr.*other encoders/settings/schema: rerun `dvc repro`"):
        check_cache(tmp_path, {**expected, "mert": "something-else"})
    write_shard(tmp_path, "mert", None, {"x": make_song("x")}, "fp-other", {"x": "h"})
    with pytest.raises(CacheError, match="mixes 2 encoder fingerprints"):
        check_cache(tmp_path)
    group = zarr.open_group(str(tmp_path / "text" / "shard-00000.zarr"), mode="r+")
    meta = group.attrs[ATTRS_KEY]
    group.attrs[ATTRS_KEY] = {**meta, "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(CacheError, match=r"schema version .*rerun `dvc repro`"):
        check_cache(tmp_path, expected)


def test_fingerprint_stable_sensitive_and_memoised(tmp_path, monkeypatch):
    weights = tmp_path / "ckpt"
    (weights / "sub").mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(os.urandom(3000))
    (weights / "sub" / "config.json").write_text('{"a": 1}')
    memo = tmp_path / "cache" / ".file_hashes.json"
    base = fingerprint(weights, {"b": 2, "a": 1}, "v1", hash_cache=memo)
    assert base == fingerprint(weights, {"a": 1, "b": 2}, "v1")  # key order does not matter
    assert base != fingerprint(weights, {"a": 1, "b": 3}, "v1")
    assert base != fingerprint(weights, {"a": 1, "b": 2}, "v2")
    files = [weights / "sub" / "config.json", weights / "model.safetensors"]
    assert fingerprint(files, {"a": 1, "b": 2}, "v1") != base  # names are relative to what was given
    assert json.loads(memo.read_text())  # digests remembered
    calls = []
    real = fp_mod.file_sha256
    monkeypatch.setattr(fp_mod, "file_sha256", lambda p: calls.append(p) or real(p))
    assert fingerprint(weights, {"a": 1, "b": 2}, "v1", hash_cache=memo) == base
    assert calls == []  # nothing re-hashed
    (weights / "sub" / "config.json").write_text('{"a": 22}')  # size changes
    assert fingerprint(weights, {"a": 1, "b": 2}, "v1", hash_cache=memo) != base
    assert len(calls) == 1
    with pytest.raises(CheckpointError, match="do not exist"):
        fingerprint(tmp_path / "nope", {}, "v1")
