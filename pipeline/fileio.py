"""Atomic, durable file writes: a temp file in the same folder, fsync, then os.replace.

A crash, Ctrl-C or power cut leaves either the old file or the new one, never half of one: the
data is flushed to disk (fsync) before the rename that publishes it, and the folder is flushed
after, so the rename itself survives a power cut. A unique temp name means two processes never
write into the same temp file.

Files get the mode a plain ``open()`` would give them (0666 minus the umask: 0644 by default).
``tempfile.mkstemp`` and safetensors' ``save_file`` create 0600 files whatever the umask
(STACK.md pitfall 16), which would make a LoRA unreadable to a ComfyUI running as another user.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import DiskFullError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def current_umask() -> int:
    """The process umask, read without changing it where the OS lets us (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting (not thread-safe, but brief)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new regular file should have: what open() gives it (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a new folder should have: what mkdir() gives it (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into or out of it) to disk; a no-op where folders cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. certain network mounts) refuse fsync on a folder
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under ``path`` (a folder about to be published by a rename)."""
    path = Path(path)
    if path.is_file():
        fsync_file(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def publish_file(tmp: str | Path, final: str | Path) -> Path:
    """Give ``tmp`` the default mode, flush it, rename it to ``final`` and flush the folder."""
    os.chmod(tmp, file_mode())
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)
    return Path(final)


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Flush a finished folder ``tmp`` and rename it to ``final`` (which must not exist), then flush
    the parent folder: after a power cut the folder is either absent or complete."""
    tmp = Path(tmp)
    os.chmod(tmp, dir_mode())  # mkdtemp makes 0700 folders
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(Path(final).parent)
    return Path(final)


def remove_dir_atomic(path: str | Path, hidden_prefix: str = ".trash-") -> None:
    """Delete a folder so that no half-deleted folder is ever seen under its name: rename it to a
    hidden name first (one atomic step), then delete that."""
    path = Path(path)
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{hidden_prefix}{path.name}-"))
    os.rmdir(trash)
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # another remover renamed it away after our exists(): removed already
        return
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _human(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


# Writers that report a full disk only in their message: safetensors ("I/O error: No space left on
# device (os error 28)") and zarr/fsspec chains that lost the errno.
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# torch.save's C++ writer says only "[enforce fail at inline_container.cc:672] . unexpected pos 576
# vs 534" (context: "basic_ios::clear: iostream error"), with no errno: a write failure that is a
# full disk only if the disk is (nearly) full afterwards.
_WRITER_FAILURE_TEXT = ("inline_container.cc", "PytorchStreamWriter", "iostream error")
_NEARLY_FULL = 1 << 20  # 1 MiB: less than that free after a failed write counts as full


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, innermost last."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path: str | Path) -> int | None:
    """Free space of the filesystem that holds ``path`` (or would: its nearest existing folder)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, path: str | Path | None = None, needed_bytes: int | None = None) -> bool:
    """True for an out-of-space / out-of-quota error anywhere in the exception's chain. With
    ``path`` (what was being written) a writer failure that carries no errno (torch.save) counts
    too when the disk there has less than ``needed_bytes`` (default 1 MiB) left."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
    if path is not None and any(t in str(e) for e in exception_chain(exc) for t in _WRITER_FAILURE_TEXT):
        free = free_bytes(path)
        return free is not None and free < max(needed_bytes or 0, _NEARLY_FULL)
    return False


@contextmanager
def disk_full_guard(path: str | Path, needed_bytes: int | None = None, kept: str = "") -> Iterator[None]:
    """Turn running out of disk space while writing ``path`` into one DiskFullError line: which
    file, that the disk is full, how much was needed (when known), and what is intact (``kept``)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc, path, needed_bytes):
            raise
        free_now = free_bytes(path)
        free = "free space unknown" if free_now is None else f"{_human(free_now)} free"
        need = f"about {_human(needed_bytes)} needed, " if needed_bytes else ""
        tail = f"; {kept}" if kept else ""
        raise DiskFullError(f"disk full while writing {path} ({need}{free}): free some space and run the "
                            f"command again{tail}") from None


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that takes a file name (torch.save,
    safetensors, matplotlib, soundfile); on success publish it as ``path`` (mode, fsync, rename),
    on any failure delete it and leave ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """A UTF-8 text file with LF line ends."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data, **dump_options) -> Path:
    options = {"indent": 2, "ensure_ascii": False, **dump_options}
    return write_text_atomic(path, json.dumps(data, **options) + "\n")
