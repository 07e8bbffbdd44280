"""Atomic writes keep the umask's mode (mkstemp and safetensors alone make 0600 files) and never
leave a half file under the final name."""
from __future__ import annotations

import os
import stat

import pytest

from pipeline import fileio


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    assert fileio.current_umask() == mask
    assert mode_of(fileio.write_text_atomic(tmp_path / "a.txt", "x")) == want
    with fileio.atomic_output(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    assert mode_of(tmp_path / "b.bin") == want


def test_lora_file_is_world_readable_under_umask_022(tmp_path, umask):
    import torch

    from pipeline.lora import LoraSettings, write_lora_file

    umask(0o022)
    for baked in (True, False):  # checkpoints / exports are baked; `export-lora --format official` is not
        path = write_lora_file({"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)},
                               tmp_path / f"lora{baked}", LoraSettings(r=2, alpha=2.0, target_modules=["a"]), baked=baked)
        assert mode_of(path) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = fileio.write_text_atomic(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_publish_dir_and_remove_dir_atomic(tmp_path, umask):
    import tempfile

    umask(0o022)
    tmp = tempfile.mkdtemp(dir=tmp_path, prefix=".tmp-")
    (tmp_path / tmp / "f").write_text("x")
    final = fileio.publish_dir(tmp, tmp_path / "done")
    assert mode_of(final) == 0o755 and (final / "f").read_text() == "x"
    fileio.remove_dir_atomic(final)
    assert list(tmp_path.iterdir()) == []


def test_remove_dir_atomic_when_another_remover_wins(tmp_path, monkeypatch):
    """Two removers of one folder: the one whose rename finds it gone treats it as removed."""
    import tempfile

    victim = tmp_path / "old"
    victim.mkdir()
    real = tempfile.mkdtemp

    def other_remover_first(*args, **kwargs):  # between our exists() and our rename
        import shutil

        shutil.rmtree(victim)
        return real(*args, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkdtemp", other_remover_first)
    fileio.remove_dir_atomic(victim)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_becomes_one_line(tmp_path):
    import errno

    from pipeline.errors import DiskFullError

    with pytest.raises(DiskFullError, match=r"disk full while writing .*x\.bin \(about 2\.0 MB needed, .* free\).*"
                                            r"the last checkpoint is intact"):
        with fileio.disk_full_guard(tmp_path / "x.bin", 2_000_000, kept="the last checkpoint is intact"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as inner:
                raise RuntimeError("wrapped") from inner
    with pytest.raises(ValueError):
        with fileio.disk_full_guard(tmp_path / "x.bin"):
            raise ValueError("not a disk problem")


def test_disk_full_without_an_errno(tmp_path, monkeypatch):
    """safetensors says ENOSPC only in its message; torch.save says nothing about the disk at all
    ("inline_container.cc … unexpected pos"): a full disk there is told by the free space left."""
    import collections
    import shutil

    from safetensors import SafetensorError

    from pipeline.errors import DiskFullError

    assert fileio.is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    torch_failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not fileio.is_disk_full(torch_failure)  # without a path: unknown
    assert not fileio.is_disk_full(torch_failure, tmp_path / "x.pt")  # this disk has room: another failure
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    assert fileio.is_disk_full(torch_failure, tmp_path / "sub" / "x.pt", needed_bytes=10_000)
    with pytest.raises(DiskFullError, match=r"sub/x\.pt \(about 10\.0 KB needed, 4\.1 KB free\)"):
        with fileio.disk_full_guard(tmp_path / "sub" / "x.pt", 10_000):
            raise torch_failure
