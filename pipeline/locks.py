"""Owner locks: one writer at a time for a folder that must never be written by two processes.

A lock is a small file holding its owner (pid, host, start time, command) and an exclusive
``flock`` on it for as long as the owner lives. The kernel drops the flock when the owner dies,
however it dies (kill -9 included), so a lock left behind by a dead process is taken over by the
next one, which says so. The owner record is what the refusal message shows ("in use by pid 1234
on host gpu1, started ..."), and it is a second line of defence where ``flock`` is not honoured
(some network filesystems): a lock whose owner is alive on this host, or that was taken on another
host, is never taken over.

Run folders use :func:`run_lock` (the file ``.<experiment>.lock`` beside the run folder: a new run
moves the old folder aside, and a lock inside it would move with it); the web UI reads the same
files (:func:`held_run_locks`) to see trainings it did not start.

    with run_lock(run_dir) as lock:      # LockHeldError naming the other owner when taken
        if lock.took_over: print(f"note: {lock.took_over.describe()} ... is gone")
        ...
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import LockHeldError

try:
    import fcntl
except ImportError:  # Windows: only the owner record protects the folder
    fcntl = None

# A reader that finds the flock taken retries briefly: the UI's probe holds a shared flock for
# microseconds, and a new owner writes its record just after taking the flock.
_RETRIES, _RETRY_SLEEP = 20, 0.05


@dataclass
class Owner:
    """Who holds a lock. ``ticks`` and ``boot`` tell a live owner from a recycled pid."""

    pid: int
    host: str
    started: float  # time.time() when the lock was taken
    command: str = ""
    ticks: int | None = None  # the process's start time in clock ticks since boot (/proc/PID/stat)
    boot: str | None = None  # /proc/sys/kernel/random/boot_id

    @classmethod
    def me(cls) -> "Owner":
        pid = os.getpid()
        return cls(pid=pid, host=socket.gethostname(), started=time.time(), command=_command(),
                   ticks=_start_ticks(pid), boot=_boot_id())

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        command = f", `{self.command}`" if self.command else ""
        return f"pid {self.pid} on host {self.host} (started {when}{command})"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the owner process still runs (True when that cannot be known: another host)."""
        if not self.on_this_host():
            return True
        if self.boot and _boot_id() and self.boot != _boot_id():
            return False  # the machine rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        ticks = _start_ticks(self.pid)
        return self.ticks is None or ticks is None or ticks == self.ticks  # else the pid was reused


class OwnerLock:
    """An exclusive owner lock on ``path`` (see the module docstring); ``what`` names the thing
    protected in messages ("experiment 'demo'"), ``hint`` says what the user can do."""

    def __init__(self, path: str | Path, what: str, hint: str = ""):
        self.path = Path(path)
        self.what = what
        self.hint = hint
        self.took_over: Owner | None = None  # the dead owner whose lock this one replaced
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OwnerLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_RETRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _flock(fd, exclusive=True):
                os.close(fd)
                time.sleep(_RETRY_SLEEP)
                continue
            if not _same_file(fd, self.path):  # the owner released (deleted) it meanwhile: again
                os.close(fd)
                continue
            previous = _parse(_read_fd(fd))
            if previous is not None and previous.pid != os.getpid() and previous.alive():
                os.close(fd)  # flock not honoured here (or a lock from another host): keep out
                raise self._refusal(previous)
            _write_fd(fd, json.dumps(asdict(Owner.me())) + "\n")
            self._fd = fd
            self.took_over = previous if previous is not None and previous.pid != os.getpid() else None
            return self
        raise self._refusal(read_owner(self.path))

    def release(self) -> None:
        """Delete the file while still holding the flock (a process waiting on the old file then
        sees it is gone and starts over), then let go."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    close = release

    def __enter__(self) -> "OwnerLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _refusal(self, owner: Owner | None) -> LockHeldError:
        who = owner.describe() if owner else "another process (it is starting)"
        hint = f"; {self.hint}" if self.hint else ""
        stale = ""
        if owner is not None and not owner.on_this_host():
            stale = f"; if nothing runs there any more, delete {self.path}"
        return LockHeldError(f"{self.what} is in use by {who}{hint}{stale}.")


def read_owner(path: str | Path) -> Owner | None:
    """The owner record of a lock file (None when absent or being written)."""
    for _ in range(3):
        try:
            owner = _parse(Path(path).read_text(encoding="utf-8"))
        except OSError:
            return None
        if owner is not None:
            return owner
        time.sleep(_RETRY_SLEEP)
    return None


def holder(path: str | Path) -> Owner | None:
    """The live owner of the lock file ``path``, or None when nobody holds it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        free = _flock(fd, exclusive=False)  # closing the fd below lets go of it again
        owner = _parse(_read_fd(fd))
    finally:
        os.close(fd)
    if free:  # nobody holds the flock: the owner is gone, unless flock is not honoured here
        return owner if owner is not None and owner.alive() else None
    return owner or read_owner(path) or Owner(pid=-1, host=socket.gethostname(), started=time.time(),
                                               command="(starting)")


# ------------------------------------------------------------------ run folders
RUN_LOCK_SUFFIX = ".lock"


def run_lock_path(run_dir: str | Path) -> Path:
    """``<exps>/.<experiment>.lock``: hidden, and never a run folder (experiment names start with a
    letter or digit)."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}{RUN_LOCK_SUFFIX}"


def run_lock(run_dir: str | Path) -> OwnerLock:
    """The lock a training holds on its run folder from before it touches the folder to its end."""
    name = Path(run_dir).name
    return OwnerLock(run_lock_path(run_dir), f"experiment '{name}' ({run_dir})",
                     hint="wait for that training to finish or stop it (kill -TERM saves a checkpoint), "
                          "or train under another --experiment name")


def held_run_locks(exps_dir: str | Path) -> dict[str, Owner]:
    """{experiment: live owner} of every run folder under ``exps_dir`` that a training holds now."""
    folder = Path(exps_dir)
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.glob(f".*{RUN_LOCK_SUFFIX}")):
        owner = holder(path)
        if owner is not None:
            found[path.name[1:-len(RUN_LOCK_SUFFIX)]] = owner
    return found


# ------------------------------------------------------------------ helpers
def _flock(fd: int, exclusive: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _write_fd(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode("utf-8"))
    os.fsync(fd)


def _parse(text: str) -> Owner | None:
    try:
        data = json.loads(text)
        return Owner(**{k: data.get(k) for k in ("pid", "host", "started", "command", "ticks", "boot")})
    except (ValueError, TypeError, AttributeError):
        return None


def _command() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("__main__.py", "aceturbo"):  # python -m stages / the script
        argv[0] = "aceturbo"
    return " ".join(argv)[:300]


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


__all__ = ["Owner", "OwnerLock", "read_owner", "holder", "run_lock", "run_lock_path", "held_run_locks"]
