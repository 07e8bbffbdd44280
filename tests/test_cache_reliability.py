"""The feature cache under concurrency and faults (docs/reliability.md, "Feature cache"): two writers
with a forced interleaving, locks and stale-lock takeover, publishing that never replaces another
writer's shard, a rerun that repairs a half shard (and `--verify` a corrupt one), leftovers cleaned
on every run, an injected ENOSPC and a real full tmpfs, a CacheError raised in a DataLoader worker,
truncated encoder weights and a fingerprint memo that sees an in-place edit."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
import zarr

from cache import lock as lock_mod
from cache import shards as shards_mod
from cache.lock import HOST, StreamLock
from cache.shards import CacheIndex, CacheLocation, ShardWriter, cleanup_temp, lock_stream, write_shard
from pipeline import locks as locks_mod
from pipeline.errors import AceTurboError, CacheError, CheckpointError, DiskFullError
from tests.conftest import REPO
from tests.test_cache_pipeline import demo_root  # noqa: F401 (fixture)
from tests.test_cache_shards import make_song


def dead_pid() -> int:
    """The pid of a process that has exited (reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def text_song(key: str, seed: int = 0) -> dict:
    song = make_song(key, seed=seed)
    return {"text_states": song.text_states, "text_masks": song.text_masks, "lyric_ids": song.lyric_ids}


def start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# --------------------------------------------------------------------------------------------
# Two writers of one stream.

PAUSED_WRITER = """
    import sys, zarr
    from cache.shards import ShardWriter
    from tests.test_cache_reliability import text_song

    real = zarr.Group.create_array
    calls = []
    def pausing(self, *args, **kwargs):  # pause half way through the store: after the first field
        calls.append(1)
        if len(calls) == 3:
            print("paused", flush=True)
            sys.stdin.readline()
        return real(self, *args, **kwargs)
    zarr.Group.create_array = pausing

    writer = ShardWriter(sys.argv[1], "text", "fp")
    writer.add("a", text_song("a"), "ha")
    print(writer.close(), flush=True)
"""


def test_second_writer_is_refused_and_never_touches_the_first_ones_store(tmp_path):
    first = start(PAUSED_WRITER, str(tmp_path))
    try:
        assert first.stdout.readline().strip() == "paused", first.stderr.read()
        stream = tmp_path / "text"
        temps = [p.name for p in stream.iterdir() if p.name.startswith(".tmp-")]
        assert temps
        # what every new writer used to do first: delete all temp stores, this live one included
        assert cleanup_temp(tmp_path) == []
        assert all(f"-{first.pid}@{HOST}-" in name for name in temps)  # it knows whose they are
        with pytest.raises(CacheError) as refused:
            ShardWriter(tmp_path, "text", "fp")
        message = str(refused.value)
        assert f"pid {first.pid} on host {HOST}" in message and "is in use by" in message and "\n" not in message
        assert [p.name for p in stream.iterdir() if p.name.startswith(".tmp-")] == temps
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        first.kill()
    index = CacheIndex.open(tmp_path)
    assert index.keys("text") == ["a"]
    song = index.read_song("a", streams=("text",))  # every field there, checksum holds
    assert torch.equal(song.lyric_ids, text_song("a")["lyric_ids"])
    with ShardWriter(tmp_path, "text", "fp") as writer:  # released: the next writer goes ahead
        writer.add("b", text_song("b", 1), "hb")
    assert CacheIndex.open(tmp_path).keys("text") == ["a", "b"]


def test_a_writer_never_replaces_a_shard_published_meanwhile(tmp_path, monkeypatch):
    write_shard(tmp_path, "latents", None, {"old": {"latents": torch.randn(8, 16, 4)}}, "fp", {"old": "h"})
    real = shards_mod._next_shard_name
    stale = iter(["shard-00000.zarr"])  # a name chosen before another writer published it

    monkeypatch.setattr(shards_mod, "_next_shard_name", lambda *a, **k: next(stale, None) or real(*a, **k))
    with ShardWriter(tmp_path, "latents", "fp") as writer:
        writer.add("new", {"latents": torch.randn(8, 16, 4)}, "h")
    assert writer.written == ["shard-00001.zarr"]
    assert CacheIndex.open(tmp_path).keys("latents") == ["new", "old"]


def test_locks_per_worker_slot_and_object_stores(tmp_path):
    with lock_stream(tmp_path, "mert", (0, 2)), lock_stream(tmp_path, "mert", (1, 2)):
        pass  # parallel encode workers write one stream together
    with lock_stream(tmp_path, "mert", (0, 2)):
        with pytest.raises(CacheError, match=f"pid {os.getpid()} on host {HOST}"):
            lock_stream(tmp_path, "mert").acquire()  # a single writer is slot 0
        with lock_stream(tmp_path, "text"):  # other streams are independent
            pass
    assert (tmp_path / "mert" / ".lock-0").read_bytes() == b""  # released
    url = f"memory://locks-{os.getpid()}"
    with lock_stream(url, "mert"):
        with pytest.raises(CacheError, match="is in use by"):
            lock_stream(url, "mert").acquire()
    with lock_stream(url, "mert"):
        pass


def test_a_lock_caught_between_truncate_and_close(tmp_path, monkeypatch):
    """release() empties the lock file, then closes it (dropping the flock); acquire() empties it,
    then writes its owner line. A writer arriving in between finds a flocked lock without an owner:
    it looks again after a moment instead of saying "pid ? on ? since ?"."""
    import fcntl

    lock_file = tmp_path / "mert" / ".lock-0"
    lock_file.parent.mkdir()

    def holder_with_no_line():
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        return fd

    fd = holder_with_no_line()
    monkeypatch.setattr(lock_mod.time, "sleep", lambda seconds: os.close(fd))  # it finishes releasing meanwhile
    with lock_stream(tmp_path, "mert") as lock:
        assert lock.held
    monkeypatch.undo()

    fd = holder_with_no_line()
    monkeypatch.setattr(locks_mod, "SETTLE_S", 0.01)
    try:
        with pytest.raises(CacheError) as caught:  # still no owner line: a line that says what is going on
            lock_stream(tmp_path, "mert").acquire()
    finally:
        os.close(fd)
    message = str(caught.value)
    assert "being taken or released by another process just now" in message and "?" not in message


def test_object_store_lock_keeps_its_start_time(monkeypatch):
    """The heartbeat rewrites the object-store lock record; "since ..." must stay the start time."""
    monkeypatch.setattr(lock_mod, "HEARTBEAT_S", 0.01)
    url = f"memory://started-{os.getpid()}"
    with lock_stream(url, "mert") as lock:
        first = lock._read_object()
        monkeypatch.setattr(lock_mod.time, "strftime", lambda *a: "LATER")
        deadline = time.time() + 30
        while lock._read_object()["heartbeat"] == first["heartbeat"] and time.time() < deadline:
            time.sleep(0.01)
        again = lock._read_object()
    assert again["heartbeat"] != first["heartbeat"] and again["started"] == first["started"] != "LATER"


def test_stale_locks_are_taken_over_with_a_message(tmp_path):
    holder = start("""
        import sys, time
        from cache.shards import lock_stream
        lock = lock_stream(sys.argv[1], "mert").acquire()
        print("held", flush=True)
        time.sleep(600)
    """, str(tmp_path))
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    with pytest.raises(CacheError, match=f"pid {holder.pid}"):
        lock_stream(tmp_path, "mert").acquire()
    os.kill(holder.pid, signal.SIGKILL)  # never releases: the kernel drops its flock
    holder.wait()
    notes = []
    location = CacheLocation(tmp_path)
    with StreamLock(location, "mert", note=notes.append):
        pass
    assert len(notes) == 1 and f"pid {holder.pid} on host {HOST}" in notes[0] and "no longer running" in notes[0]

    # another machine's lock: held while its heartbeat is fresh, taken over once it is stale
    lock_file = tmp_path / "mert" / ".lock-0"
    lock_file.write_text(json.dumps({"pid": 4242, "host": "other-machine", "started": "yesterday"}))
    with pytest.raises(CacheError, match="pid 4242 on host other-machine.*taken over after 15 minutes"):
        StreamLock(location, "mert", note=notes.append).acquire()
    old = time.time() - lock_mod.STALE_AFTER_S - 60
    os.utime(lock_file, (old, old))
    with StreamLock(location, "mert", note=notes.append):
        pass
    assert "pid 4242 on host other-machine" in notes[-1] and "no heartbeat for 16 minutes" in notes[-1]


def test_cleanup_deletes_only_stores_of_writers_that_are_gone(tmp_path):
    stream = tmp_path / "mert"
    names = {
        # a dead-looking pid is not enough: it may be a live writer in another PID namespace
        # that shares this host name (containers with --uts=host, cloned VMs)
        "dead": f".tmp-shard-w1-{dead_pid()}@{HOST}-0123abcd.zarr",
        "dead-old": f".tmp-shard-w1-{dead_pid()}@{HOST}-4567abcd.zarr",
        "alive-old": f".tmp-shard-w1-{os.getpid()}@{HOST}-0123abcd.zarr",
        "elsewhere": ".tmp-shard-w1-77@other-machine-0123abcd.zarr",
        "elsewhere-old": ".tmp-shard-78@other-machine-0123abcd.zarr",  # named before slots were
        "trash": ".trash-shard-00003.zarr-x1y2",
    }
    for name in names.values():
        (stream / name).mkdir(parents=True)
    old = time.time() - lock_mod.STALE_AFTER_S - 1
    for key in ("dead-old", "alive-old", "elsewhere-old"):
        os.utime(stream / names[key], (old, old))
    removed = cleanup_temp(tmp_path)
    assert sorted(removed) == sorted(f"mert/{names[k]}" for k in ("dead-old", "elsewhere-old", "trash"))
    assert sorted(p.name for p in stream.iterdir()) == sorted(names[k] for k in ("dead", "alive-old", "elsewhere"))

    # The holder of slot 1's lock deletes slot-1 stores whatever their pid says (the lock proves
    # their writer is gone) and leaves the other slots' recent ones alone.
    other_slot = f".tmp-shard-w0-{dead_pid()}@{HOST}-89abcdef.zarr"
    (stream / other_slot).mkdir()
    with lock_stream(tmp_path, "mert", (1, 2)) as lock:
        removed = cleanup_temp(tmp_path, streams=("mert",), lock=lock)
    assert sorted(removed) == sorted(f"mert/{names[k]}" for k in ("dead", "alive-old", "elsewhere"))
    assert sorted(p.name for p in stream.iterdir()) == sorted([".lock-1", other_slot])


def test_a_temp_store_deleted_under_a_writer_is_one_line(tmp_path, monkeypatch):
    """Were a live writer's temp store deleted anyway (a cleanup that misjudged it), its publish says
    so in one line instead of a FileNotFoundError traceback, and publishes nothing."""
    real = shards_mod._fill_store

    def then_deleted(location, stream, tmp, *args, **kwargs):
        real(location, stream, tmp, *args, **kwargs)
        assert tmp.startswith(".tmp-shard-w1-")  # the writer's lock slot is in the name
        shutil.rmtree(location.path(stream, tmp))

    monkeypatch.setattr(shards_mod, "_fill_store", then_deleted)
    writer = ShardWriter(tmp_path, "latents", "fp", worker=(1, 2))
    writer.add("a", {"latents": torch.randn(8, 16, 4)}, "ha")
    with pytest.raises(CacheError) as caught:
        writer.close()
    message = str(caught.value)
    assert "was deleted by another process" in message and "run this again" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == [".lock-1"]


# --------------------------------------------------------------------------------------------
# The encode step: locked, repairs what it trusted, cleans leftovers on every run.


@pytest.fixture
def text_project(tmp_path, demo_root):
    """A project with three songs, ingested (the text stream needs no decoding)."""
    from pipeline.config import EncodeConfig, IngestConfig, PathsConfig, ProjectConfig
    from pipeline.dataset import scan_dataset, write_manifest, write_stage_views
    from pipeline.tiny.demo import demo_models
    from pipeline.tiny.songs import make_demo_songs

    data = tmp_path / "data"
    make_demo_songs(data, n=3, seconds=4.0)
    project = ProjectConfig(paths=PathsConfig(data=str(data), cache=str(tmp_path / "cache")),
                            models=demo_models(demo_root), ingest=IngestConfig(),
                            encode=EncodeConfig(text_variants=2))
    report = scan_dataset(project.paths.data, project.ingest, progress=False)
    write_manifest(project.paths.manifest, report.songs)
    write_stage_views(report.songs, project.paths.audio_list, project.paths.text_list)
    return project


def test_encode_is_refused_while_the_stream_is_locked_and_cleans_leftovers(text_project):
    from pipeline.encoding import encode_stream

    features = Path(text_project.paths.features)
    with lock_stream(features, "text"):
        with pytest.raises(CacheError, match=f"feature stream 'text' .* is in use by pid {os.getpid()}"):
            encode_stream(text_project, "text", progress=False)
    assert encode_stream(text_project, "text", progress=False).encoded == 3
    leftovers = [features / "text" / f".tmp-shard-w0-{dead_pid()}@{HOST}-0badc0de.zarr",
                 features / "text" / ".trash-shard-00000.zarr-abcd"]
    for path in leftovers:
        (path / "c").mkdir(parents=True)
    summary = encode_stream(text_project, "text", progress=False)  # nothing to encode...
    assert (summary.encoded, summary.kept) == (0, 3)
    assert not any(path.exists() for path in leftovers)  # ...and still tidied


def test_encode_cleans_temp_stores_once(text_project, monkeypatch):
    """The encode step cleans under its lock; the ShardWriter it hands that lock to does not again."""
    from pipeline import encoding

    calls, real = [], shards_mod.cleanup_temp

    def counted(*args, **kwargs):
        calls.append(kwargs.get("streams"))
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "cleanup_temp", counted)
    monkeypatch.setattr(encoding, "cleanup_temp", counted)
    assert encoding.encode_stream(text_project, "text", progress=False).encoded == 3
    assert calls == [("text",)]


def biggest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _only_shard(features: Path, stream: str) -> Path:
    (shard,) = [p for p in (features / stream).iterdir() if p.name.startswith("shard-")]
    return shard


def test_rerun_replaces_a_half_shard_and_verify_a_corrupt_one(text_project, tmp_path):
    from click.testing import CliRunner

    from pipeline.encoding import encode_stream
    from stages.encode import cli

    features = Path(text_project.paths.features)
    encode_stream(text_project, "text", progress=False)
    shutil.rmtree(_only_shard(features, "text") / "text_states")  # what two racing writers published
    summary = encode_stream(text_project, "text", progress=False)
    assert (summary.encoded, summary.kept) == (3, 0)
    assert len(summary.damaged) == 1 and "is incomplete" in summary.damaged[0]
    index = CacheIndex.open(features)
    assert len(index.shards["text"]) == 1
    for key in index.keys("text"):
        index.read_song(key, streams=("text",))

    # flip bytes inside a stored array: the layout still checks out, only the checksum can tell
    chunk = biggest_file(_only_shard(features, "text") / "text_states" / "c")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert encode_stream(text_project, "text", progress=False).kept == 3  # the cheap default trusts it
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": dataclasses.asdict(text_project.paths),
                                      "models": dataclasses.asdict(text_project.models),
                                      "encode": dataclasses.asdict(text_project.encode)}))
    result = CliRunner().invoke(cli, ["text", "--params", str(params), "--verify"])
    assert result.exit_code == 0, result.output
    assert "damaged shards replaced 1" in result.output and "Note: cache shard" in result.output
    assert "encoded 1, up to date 2" in result.output  # only the song that fails is encoded again
    index = CacheIndex.open(features)
    for key in index.keys("text"):
        index.read_song(key, streams=("text",))


# --------------------------------------------------------------------------------------------
# Full disk.


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_a_shard_is_one_line_and_keeps_the_cache(tmp_path, monkeypatch):
    write_shard(tmp_path, "mert", None, {"a": {"mert": torch.randn(50, 12)}}, "fp", {"a": "h"})

    async def full(self, key, value):
        _enospc()

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    with pytest.raises(DiskFullError) as caught:
        with ShardWriter(tmp_path, "mert", "fp") as writer:
            writer.add("b", {"mert": torch.randn(50, 12)}, "h")
    message = str(caught.value)
    assert message.startswith("disk full while writing ") and ".tmp-shard-" in message and "\n" not in message
    assert "needed" in message and f"the shards already in {tmp_path / 'mert'} are intact" in message
    monkeypatch.undo()
    assert CacheIndex.open(tmp_path).keys("mert") == ["a"]
    assert [p.name for p in (tmp_path / "mert").iterdir() if p.name.startswith(".tmp-")] == []


def test_disk_full_while_writing_pcm_and_manifest(tmp_path, monkeypatch):
    from cache.pcm import has_pcm, write_pcm
    from pipeline import dataset

    write_pcm(tmp_path / "pcm", "a" * 64, torch.zeros(2, 480), 48000)

    async def full(self, key, value):
        _enospc()

    with monkeypatch.context() as patch:
        patch.setattr(zarr.storage.LocalStore, "set", full)
        with pytest.raises(DiskFullError, match=r"disk full while writing .*\.tmp-b+.*decoded audio already in"):
            write_pcm(tmp_path / "pcm", "b" * 64, torch.zeros(2, 480), 48000)
    assert has_pcm(tmp_path / "pcm", "a" * 64) and not has_pcm(tmp_path / "pcm", "b" * 64)
    assert sorted(p.name for p in (tmp_path / "pcm").iterdir()) == ["a" * 32 + ".zarr"]

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("old\n")
    monkeypatch.setattr(dataset, "write_text_atomic", _enospc)
    with pytest.raises(DiskFullError, match=r"manifest\.jsonl .*the previous manifest\.jsonl is intact"):
        dataset.write_manifest(manifest, [])
    assert manifest.read_text() == "old\n"


FILL_TMPFS = """
    import sys, torch
    from cache.shards import CacheIndex, ShardSettings, ShardWriter
    from pipeline.errors import AceTurboError
    folder = sys.argv[1]
    try:
        with ShardWriter(folder, "mert", "fp", ShardSettings(max_songs=1, compressor="none")) as writer:
            for i in range(100):
                writer.add(f"k{i:03d}", {"mert": torch.randn(400, 128)}, "h")  # 100 KB per shard
    except AceTurboError as exc:
        print("ERROR", exc)
    index = CacheIndex.open(folder)
    for key in index.keys("mert"):
        index.read_stream("mert", key)
    print("READABLE", len(index.keys("mert")))
"""


def test_a_real_full_tmpfs(tmp_path):
    """A 1 MB tmpfs in a private mount namespace (unshare -rm); skipped where that is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {mount}"],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({probe.stderr.strip() if probe else 'no unshare'})")
    script = textwrap.dedent(FILL_TMPFS)
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m none "$1" && '
                             f'exec "$2" -c "$3" "$1"', "sh", str(mount), sys.executable, script],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ERROR disk full while writing ") and "are intact" in lines[0], result.stdout
    kept = int(lines[-1].split()[1])
    assert 3 <= kept < 100  # every published shard survived and reads back with its checksum


# --------------------------------------------------------------------------------------------
# One-line errors.


def test_cache_error_in_a_dataloader_worker_is_the_original_one_line(tmp_path):
    from cache.loader import LoaderSettings, make_loader

    songs = {f"s{i}": make_song(f"s{i}", 30, seed=i) for i in range(4)}
    for stream in ("latents", "mert", "mhubert", "text"):
        write_shard(tmp_path, stream, None, songs, f"fp-{stream}", {k: "h" for k in songs})
    chunk = biggest_file(tmp_path / "mert" / "shard-00000.zarr" / "mert" / "c")
    data = bytearray(chunk.read_bytes())
    for i in range(64, len(data) - 64, 97):
        data[i] ^= 0x5A
    chunk.write_bytes(bytes(data))
    loader = make_loader(tmp_path, LoaderSettings(num_workers=2, memory_cache_mb=0, epochs=1, max_seconds=2.0))
    with pytest.raises(CacheError) as caught:
        list(loader)
    message = str(caught.value)
    assert "Caught" not in message and "Traceback" not in message and "\n" not in message
    assert message.startswith(f"cache shard {tmp_path / 'mert' / 'shard-00000.zarr'} is corrupt")
    assert "aceturbo encode mert --verify" in message


def _load(part: str, root: Path):
    acestep = root / "ACE-Step-v1-tiny"
    if part in ("ace_step_transformer",):
        from pipeline.models.transformer import ACEStepTransformer2DModel

        return ACEStepTransformer2DModel.from_pretrained(acestep / part)
    if part in ("music_dcae_f8c8", "music_vocoder"):
        from pipeline.models.codec import MusicDCAE

        return MusicDCAE.from_checkpoint(acestep)
    if part == "umt5-base":
        from pipeline.models.text_encoder import UMT5TextEncoder

        return UMT5TextEncoder.from_folder(acestep / part)
    from pipeline.models.ssl import MertExtractor, MHubertExtractor

    return (MertExtractor if part == "MERT-tiny" else MHubertExtractor).from_folder(root / part)


def _bad_header(data: bytes, keep: str) -> bytes:
    """The file with its JSON header made wrong in shape (same data after it)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    if keep == "no-offsets":  # one tensor entry without data_offsets
        del header[next(k for k in header if k != "__metadata__")]["data_offsets"]
    else:  # "list": a header that is a JSON list
        header = list(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


@pytest.mark.parametrize("part, weights", [
    ("ace_step_transformer", "ACE-Step-v1-tiny/ace_step_transformer/diffusion_pytorch_model.safetensors"),
    ("music_dcae_f8c8", "ACE-Step-v1-tiny/music_dcae_f8c8/diffusion_pytorch_model.safetensors"),
    ("music_vocoder", "ACE-Step-v1-tiny/music_vocoder/diffusion_pytorch_model.safetensors"),
    ("umt5-base", "ACE-Step-v1-tiny/umt5-base/model.safetensors"),
    ("MERT-tiny", "MERT-tiny/model.safetensors"),
    ("mHuBERT-tiny", "mHuBERT-tiny/model.safetensors"),
])
@pytest.mark.parametrize("keep", ["half", "header", "no-offsets", "list"])
def test_truncated_weight_file_is_a_checkpoint_error_naming_it(demo_root, tmp_path, part, weights, keep):
    root = tmp_path / "models"
    shutil.copytree(demo_root, root)
    path = root / weights
    data = path.read_bytes()
    cut = {"half": data[: len(data) // 2], "header": data[:20]}
    path.write_bytes(cut[keep] if keep in cut else _bad_header(data, keep))
    with pytest.raises(CheckpointError) as caught:
        _load(part, root)
    message = str(caught.value)
    kind = "truncated" if keep in cut else "corrupt"
    assert f"weight file '{path}' is {kind}" in message and "Re-download" in message and "\n" not in message


def test_truncated_torch_bin_is_found(tmp_path):
    from pipeline.checkpoints import weight_file_problem

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1000)}, path)
    assert weight_file_problem(path) is None
    path.write_bytes(path.read_bytes()[:3000])
    assert weight_file_problem(path).startswith("truncated or corrupt")


def test_fingerprint_memo_sees_an_edit_that_keeps_size_and_mtime(tmp_path):
    from cache.fingerprint import fingerprint

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x01" * 4096)
    memo = tmp_path / "memo.json"
    before = fingerprint(weights, {}, "v", hash_cache=memo)
    stat = weights.stat()
    with open(weights, "r+b") as handle:  # in place: same inode, same size
        handle.write(b"\x02")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime back
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert fingerprint(weights, {}, "v", hash_cache=memo) != before


def test_a_queued_experiment_shares_the_workspace_fingerprint_memo(tmp_path, monkeypatch):
    """`dvc exp run --queue` runs in a temp copy (DVC_ROOT: the original repository): the weights
    hashed there once are only stat'ed in the copy."""
    from cache import fingerprint as fp

    original, copy = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "run1"
    (original / "workspace" / "cache").mkdir(parents=True)
    (copy / "workspace" / "cache").mkdir(parents=True)
    weights = original / "model.safetensors"
    weights.write_bytes(b"\x01" * 4096)
    monkeypatch.setenv("DVC_ROOT", str(original))
    monkeypatch.chdir(original)
    before = fp.fingerprint(weights, {}, "v", hash_cache=fp.hash_cache_path("workspace/cache"))
    monkeypatch.chdir(copy)
    assert fp.hash_cache_path("workspace/cache") == original / "workspace" / "cache" / fp.HASH_CACHE_NAME
    hashed = []
    monkeypatch.setattr(fp, "file_sha256", lambda path: hashed.append(path) or "x")
    assert fp.fingerprint(weights, {}, "v", hash_cache=fp.hash_cache_path("workspace/cache")) == before
    assert hashed == []
    monkeypatch.delenv("DVC_ROOT")
    assert fp.hash_cache_path("workspace/cache") == Path("workspace/cache") / fp.HASH_CACHE_NAME
