"""Owner locks: one writer at a time for something that must never be written by two processes.

A lock is a small file holding its owner record (pid, host, start time, command, and the process's
start ticks and boot id, which tell a live owner from a recycled pid) and an exclusive ``flock`` on
it for as long as the owner lives. The kernel drops the flock when the owner dies, however it dies
(kill -9 included), so a lock left behind by a dead process is taken over by the next one, which
says so. The owner record is what the refusal message shows ("in use by pid 1234 on host gpu1
(started ...)"), and it is a second line of defence where ``flock`` is not honoured (some network
filesystems): a lock whose owner is alive on this host, or that was taken on another host, is not
taken over. A lock of another host counts as alive forever, or, for a lock whose holder touches it
every few minutes (``stale_after``, the feature cache's stream locks), until it is that old.

Run folders use :func:`run_lock` (the file ``.<experiment>.lock`` beside the run folder: a new run
moves the old folder aside, and a lock inside it would move with it); the web UI reads the same
files (:func:`held_run_locks`) to see trainings it did not start. The feature cache's stream locks
(cache/lock.py) are OwnerLocks too, and share :class:`Owner` and the messages with their
object-store variant.

    with run_lock(run_dir) as lock:      # LockHeldError naming the other owner when taken
        if lock.took_over: print(f"note: {lock.took_over_line}")
        ...
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import AceTurboError, LockHeldError
from pipeline.fileio import file_mode, fsync_dir

try:
    import fcntl
except ImportError:  # Windows: only the owner record protects the folder
    fcntl = None

# This machine in owner records and temp-store names (cache/lock.py: only [A-Za-z0-9.-], so a name
# that carries it can be parsed back).
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
STALE_AFTER_S = 15 * 60.0  # a heartbeat lock (or temp store) of another machine untouched this long is abandoned
# A lock found flocked without a live owner record is being taken or released (a new owner writes
# its record just after taking the flock; the UI's probe holds a shared flock for microseconds):
# look again, SETTLE_TRIES times SETTLE_S apart, before saying so.
SETTLE_S, SETTLE_TRIES = 0.05, 20


@dataclass
class Owner:
    """Who holds a lock. ``ticks`` and ``boot`` tell a live owner from a recycled pid."""

    pid: int
    host: str
    started: float | str  # time.time() when the lock was taken (text in records of older versions)
    command: str = ""
    ticks: int | None = None  # the process's start time in clock ticks since boot (/proc/PID/stat)
    boot: str | None = None  # /proc/sys/kernel/random/boot_id

    @classmethod
    def me(cls) -> "Owner":
        pid = os.getpid()
        return cls(pid=pid, host=HOST, started=time.time(), command=_command(), ticks=_start_ticks(pid),
                   boot=_boot_id())

    @classmethod
    def from_record(cls, data) -> "Owner | None":
        """The owner in a parsed record (a dict with at least pid and host); None for anything else
        (an empty or half-written record)."""
        if not isinstance(data, dict) or data.get("host") is None:
            return None
        try:
            return cls(pid=int(data.get("pid") or 0), host=str(data["host"]), started=data.get("started") or "?",
                       command=str(data.get("command") or ""), ticks=data.get("ticks"), boot=data.get("boot"))
        except (TypeError, ValueError):
            return None

    def record(self, **extra) -> bytes:
        """The owner record as written into a lock (``extra``: fields of a particular kind of lock)."""
        return (json.dumps({**asdict(self), **extra}) + "\n").encode("utf-8")

    def describe(self) -> str:
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
                if isinstance(self.started, (int, float)) else self.started)
        command = f", `{self.command}`" if self.command else ""
        return f"pid {self.pid} on host {self.host} (started {when}{command})"

    def on_this_host(self) -> bool:
        return self.host in (HOST, socket.gethostname())

    def alive(self, touched: float | None = None, stale_after: float = STALE_AFTER_S) -> bool:
        """Whether the owner process still runs. On another host that cannot be known: True, unless
        ``touched`` (when its holder last showed it was alive: a heartbeat) is older than ``stale_after``."""
        if not self.on_this_host():
            return touched is None or time.time() - touched < stale_after
        if self.pid <= 0:
            return False  # 0 / -1 would ask about a process group or every process
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


def refusal(what: str, owner: Owner | None, hint: str, lock: str, stale_after: float | None,
            error: type[AceTurboError] = LockHeldError) -> AceTurboError:
    """The one-line error for a lock held by ``owner`` (None: being taken or released just now)."""
    if owner is None:
        return error(f"{what} is being taken or released by another process just now; run this again.")
    hint = f"; {hint}" if hint else ""
    stale = ""
    if not owner.on_this_host():
        stale = (f"; if nothing runs there any more, delete {lock}" if stale_after is None else
                 f"; if that machine stopped without releasing it, its lock {lock} is taken over after "
                 f"{stale_after / 60:.0f} minutes without a heartbeat")
    return error(f"{what} is in use by {owner.describe()}{hint}{stale}.")


def takeover_line(what: str, owner: Owner, touched: float | None) -> str:
    """What a new owner says when it takes the lock of ``owner``, who is gone."""
    why = ("which is no longer running" if owner.on_this_host() or touched is None else
           f"which sent no heartbeat for {(time.time() - touched) / 60:.0f} minutes")
    return f"took over the lock of {what} from {owner.describe()}, {why}"


class OwnerLock:
    """An exclusive owner lock on the local file ``path`` (see the module docstring).

    ``what`` names the thing protected in messages ("experiment 'demo' (...)"), ``hint`` says what
    the user can do, ``error`` is the AceTurboError class of the refusal. ``stale_after``: the holder
    touches the file at least that often (a heartbeat), so a lock of another host untouched for
    longer is taken over (None: never). ``keep_file``: release empties the file instead of deleting it.
    """

    def __init__(self, path: str | Path, what: str, hint: str = "", error: type[AceTurboError] = LockHeldError,
                 stale_after: float | None = None, keep_file: bool = False):
        self.path = Path(path)
        self.what = what
        self.hint = hint
        self.error = error
        self.stale_after = stale_after
        self.keep_file = keep_file
        self.took_over: Owner | None = None  # the dead owner whose lock this one replaced
        self.took_over_line: str | None = None  # ... and the line that says so
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OwnerLock":
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.path.parent.parent)  # the new folder survives a power cut
        last, orphaned = None, False
        for attempt in range(SETTLE_TRIES):
            if attempt:
                time.sleep(SETTLE_S)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                flocked = _flock(fd, exclusive=True)
                if flocked is False or not _same_file(fd, self.path):  # busy, or released (deleted) meanwhile
                    last = _owner_in(_read_fd(fd))
                    if flocked is False and last is not None and self._alive(last, self._touched(fd)):
                        raise self._refusal(last)
                    # flocked by a process that is not the owner: the owner's forked children (a
                    # killed trainer's DataLoader workers share its lock file) until they exit
                    orphaned = flocked is False and last is not None and last.on_this_host()
                    os.close(fd)
                    continue
                previous = _owner_in(_read_fd(fd))
                touched = self._touched(fd)
                if previous is not None and (not flocked or previous.pid != os.getpid()) \
                        and self._alive(previous, touched):
                    raise self._refusal(previous)  # flock not honoured here, or a lock of another host
                os.ftruncate(fd, 0)
                os.pwrite(fd, Owner.me().record(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            if previous is not None and previous.pid != os.getpid():
                self.took_over, self.took_over_line = previous, takeover_line(self.what, previous, touched)
            return self
        if orphaned:
            raise self.error(f"{self.what} is still locked by the exiting child processes (such as "
                             f"DataLoader workers) of the stopped {last.describe()}; retry in a few seconds.")
        raise self._refusal(last)

    def touch(self) -> None:
        """Show that the holder is alive (the heartbeat of a lock with ``stale_after``)."""
        os.utime(self.path)

    def release(self) -> None:
        """Empty the file (``keep_file``) or delete it while still holding the flock (a process
        waiting on the old file then sees it is gone and starts over), then let go."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.keep_file:
                os.ftruncate(fd, 0)  # empty = released cleanly
            elif _same_file(fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)

    close = release

    def __enter__(self) -> "OwnerLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _touched(self, fd: int) -> float | None:
        """When the holder last touched the lock (only heartbeat locks say anything with it)."""
        return os.fstat(fd).st_mtime if self.stale_after is not None else None

    def _alive(self, owner: Owner, touched: float | None) -> bool:
        return owner.alive() if touched is None else owner.alive(touched, self.stale_after)

    def _refusal(self, owner: Owner | None) -> AceTurboError:
        return refusal(self.what, owner, self.hint, str(self.path), self.stale_after, self.error)


def read_owner(path: str | Path) -> Owner | None:
    """The owner record of a lock file (None when absent or being written)."""
    for _ in range(3):
        try:
            owner = _owner_in(Path(path).read_text(encoding="utf-8"))
        except OSError:
            return None
        if owner is not None:
            return owner
        time.sleep(SETTLE_S)
    return None


def holder(path: str | Path, stale_after: float | None = None) -> Owner | None:
    """The live owner of the lock file ``path``, or None when nobody holds it. ``stale_after``: the
    heartbeat of a lock that has one (OwnerLock's), which ends another host's claim."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        free = _flock(fd, exclusive=False) is not False  # closing the fd below lets go of it again
        owner = _owner_in(_read_fd(fd))
        touched = os.fstat(fd).st_mtime if stale_after is not None else None
    finally:
        os.close(fd)
    if free:  # nobody holds the flock: the owner is gone, unless flock is not honoured here
        alive = owner is not None and (owner.alive() if touched is None else owner.alive(touched, stale_after))
        return owner if alive else None
    return owner or read_owner(path) or Owner(pid=-1, host=HOST, started=time.time(), command="(starting)")


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
def _flock(fd: int, exclusive: bool) -> bool | None:
    """Take the flock: True; False when another process holds it; None where the filesystem has
    no flock (then the owner record decides)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _owner_in(data: bytes | str) -> Owner | None:
    return Owner.from_record(parse_record(data))


def parse_record(data: bytes | str) -> dict | None:
    """A lock record's JSON object; None when empty or damaged (its writer died mid-write)."""
    try:
        value = json.loads(data) if data.strip() else None
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _command() -> str:
    argv = list(sys.argv)
    if argv and (Path(argv[0]).name == "aceturbo" or Path(argv[0]).parent.name == "stages"):  # the script / python -m stages
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


__all__ = ["HOST", "STALE_AFTER_S", "Owner", "OwnerLock", "refusal", "takeover_line", "parse_record", "read_owner",
           "holder", "run_lock", "run_lock_path", "held_run_locks"]
