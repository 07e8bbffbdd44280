"""Who is writing a feature stream: one lock file per (stream, encode worker) naming its owner.

    <cache>/<stream>/.lock-<worker index>   {"pid", "host", "started", "command", "worker"}

A writer of a stream (the encode step, ShardWriter, write_shard, apply_plan) holds the lock of its
worker slot for as long as it writes, so two processes never encode the same stream at once: the
second one stops with one line naming the pid, host and start time of the first. Parallel encode
workers (``--num-workers-total N --worker-index i``, torchrun) hold different slots (``.lock-i``),
so they still run together; a single writer is slot 0.

Local folders: holding the lock is an ``flock`` on that file. The kernel drops it when its process
ends in any way (kill -9 included), so a lock left by a dead process on this machine is free at
once; its owner line is still in the file, and the next writer says it takes it over. A lock taken
on another machine (a shared NFS folder whose flock may not cross machines) counts as held while
its file's mtime, touched every ``HEARTBEAT_S`` by the holder, is younger than ``STALE_AFTER_S``.
A released lock is an empty file (deleting it would race with a writer opening it).

Object stores (``s3://``, ``memory://``): best effort. There is no atomic create-if-absent in
fsspec, so the lock is an object written, then read back to see who won; two writers starting in
the same instant can both get it. Its heartbeat is a time inside the object.

Temp stores carry their writer in their name: ``w<slot>-<pid>@<host>`` (``temp_name``; the slot of
the stream lock held while writing, none for decoded audio). The holder of slot i's lock deletes
slot-i temp stores unconditionally: the lock proves their writer is gone. Any other temp store is
deleted only when its writer looks gone (``writer_gone``) AND it has not changed for
``STALE_AFTER_S``: a pid that looks dead may be alive in another PID namespace with the same host
name (containers sharing the UTS namespace, cloned VMs), so the pid alone is not proof.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import threading
import time
import uuid

from pipeline.errors import CacheError
from pipeline.fileio import file_mode, fsync_dir

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock file's owner line is all there is
    fcntl = None

HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
HEARTBEAT_S = 60.0  # how often a holder shows it is alive
STALE_AFTER_S = 15 * 60.0  # another machine's lock or temp store untouched this long is abandoned
SETTLE_S = 0.2  # a flocked lock without an owner line is being taken or released: look again after this
_TAG = re.compile(r"-(?:w(\d+)-)?(\d+)@([A-Za-z0-9._-]+)-[0-9a-f]{8}(?:\.zarr)?$")


def owner_tag() -> str:
    """``<pid>@<host>`` of this process: put into temp store names so cleanup knows their writer."""
    return f"{os.getpid()}@{HOST}"


def temp_name(prefix: str, suffix: str = "", slot: int | None = None) -> str:
    """A unique temp name that says who writes it: ``<prefix>-[w<slot>-]<pid>@<host>-<random><suffix>``;
    ``slot``: the worker slot of the stream lock the writer holds."""
    held = "" if slot is None else f"w{int(slot)}-"
    return f"{prefix}-{held}{owner_tag()}-{uuid.uuid4().hex[:8]}{suffix}"


def temp_slot(name: str) -> int | None:
    """The lock slot a temp store was written under (``temp_name``); None when it names none."""
    match = _TAG.search(name)
    return int(match.group(1)) if match and match.group(1) is not None else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # 0 / -1 would ask about a process group or every process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: another user's process
    return True


def owner_alive(pid: int, host: str, touched: float | None) -> bool:
    """On this machine: is the pid running. Elsewhere: was the thing touched recently (unknown
    time: assume alive, the safe answer)."""
    if host == HOST:
        return pid_alive(pid)
    return touched is None or time.time() - touched < STALE_AFTER_S


def writer_gone(name: str, touched: float | None) -> bool:
    """True when the temp store ``name`` (made with ``temp_name``) is unchanged for ``STALE_AFTER_S``
    and its writer does not look alive (a name without an owner, from an older version: age alone).
    Age as well as liveness: a pid of this host name may live in another PID namespace."""
    if touched is None or time.time() - touched < STALE_AFTER_S:
        return False
    match = _TAG.search(name)
    return match is None or not owner_alive(int(match.group(2)), match.group(3), touched)


def _describe(info: dict) -> str:
    command = f", running `{info['command']}`" if info.get("command") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}{command}"


class StreamLock:
    """The lock of one (stream, worker slot) of a cache location (a cache.shards.CacheLocation).

    ``with StreamLock(location, "mert"):`` or ``acquire()`` / ``release()``. Raises CacheError when
    a live process holds it. ``took_over`` is the line said when a dead owner's lock was taken.
    """

    def __init__(self, location, stream: str, worker: tuple[int, int] = (0, 1), note=None):
        self.location = location
        self.stream = stream
        self.worker = worker
        self.name = f".lock-{worker[0]}"
        self.path = location.path(stream, self.name)
        self.took_over: str | None = None
        self._note = note if note is not None else (lambda line: print(f"Note: {line}", file=sys.stderr))
        self._fd: int | None = None
        self._nonce = uuid.uuid4().hex
        self._held = False
        self._started = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- who holds it ----------------------------------------------------------------------------

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": HOST, "started": self._started,
                "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:200],
                "worker": list(self.worker), "nonce": self._nonce, "heartbeat": time.time()}

    def _busy(self, info: dict) -> CacheError:
        where = self.location.url_of(self.stream)
        later = "" if info.get("host") == HOST else (
            f"; if that machine stopped without releasing it, it is taken over after "
            f"{STALE_AFTER_S / 60:.0f} minutes without a heartbeat")
        return CacheError(f"the {self.stream} features in {where} are being written by {_describe(info)} "
                          f"(lock {self.location.url_of(self.stream, self.name)}): wait for it to finish "
                          f"or stop it, then run this again{later}")

    def _taking_over(self, info: dict, why: str) -> None:
        self.took_over = (f"taking over the {self.stream} lock of {_describe(info)} ({why}); "
                          f"its unfinished temp stores are deleted")
        self._note(self.took_over)

    # -- acquire / release -----------------------------------------------------------------------

    def acquire(self) -> "StreamLock":
        if self._held:
            raise RuntimeError(f"{self.path} is already held by this StreamLock")
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # once: heartbeats rewrite the record
        if self.location.local:
            self._acquire_local()
        else:
            self._acquire_object()
        self._held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lock-{self.stream}", daemon=True)
        self._thread.start()
        return self

    def _acquire_local(self) -> None:
        folder = self.location.path(self.stream)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            fsync_dir(os.path.dirname(folder))  # the stream folder itself survives a power cut
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            flocked = self._flock(fd)
            previous = _parse(os.pread(fd, 1 << 16, 0))
            if previous:
                same_machine = previous.get("host") == HOST
                touched = os.fstat(fd).st_mtime
                if flocked and same_machine:
                    # The kernel dropped its flock: the owner ended without releasing (killed).
                    self._taking_over(previous, f"pid {previous.get('pid')} is gone")
                elif owner_alive(int(previous.get("pid", 0)), str(previous.get("host")), touched):
                    raise self._busy(previous)
                else:
                    why = (f"pid {previous.get('pid')} is gone" if same_machine else
                           f"no heartbeat for {(time.time() - touched) / 60:.0f} minutes")
                    self._taking_over(previous, why)
            data = json.dumps(self._info()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _flock(self, fd: int) -> bool:
        """Take the flock; False where the filesystem has none (then the owner line decides)."""
        if fcntl is None:
            return False
        for attempt in range(2):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                holder = _parse(os.pread(fd, 1 << 16, 0))
                if holder and holder.get("pid"):
                    raise self._busy(holder) from None
                # Flocked but no owner line (empty or half written): its holder is between the
                # truncate and the write of acquire, or the truncate and the close of release.
                if attempt == 0:
                    time.sleep(SETTLE_S)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return False
                raise
        raise CacheError(f"the {self.stream} lock {self.location.url_of(self.stream, self.name)} is being taken "
                         f"or released by another process just now; run this again")

    def _read_object(self) -> dict | None:
        try:
            return _parse(self.location.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def _acquire_object(self) -> None:
        previous = self._read_object()
        if previous:
            if owner_alive(int(previous.get("pid", 0)), str(previous.get("host")), previous.get("heartbeat")):
                raise self._busy(previous)
            self._taking_over(previous, "its owner is gone")
        self.location.fs.pipe_file(self.path, json.dumps(self._info()).encode())
        winner = self._read_object() or {}
        if winner.get("nonce") != self._nonce:  # another writer wrote after us: it has the lock
            raise self._busy(winner)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self.location.local:
                    os.utime(self.path)
                else:
                    self.location.fs.pipe_file(self.path, json.dumps(self._info()).encode())
            except OSError:
                pass  # a missed heartbeat only matters to another machine, after STALE_AFTER_S

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.location.local:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # empty = released cleanly
            finally:
                os.close(fd)  # drops the flock
        else:
            current = self._read_object()
            if current and current.get("nonce") == self._nonce:
                self.location.fs.rm_file(self.path)

    @property
    def held(self) -> bool:
        return self._held

    def covers(self, location, stream: str) -> bool:
        return self._held and stream == self.stream and location.url == self.location.url

    def __enter__(self) -> "StreamLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(data: bytes) -> dict | None:
    try:
        info = json.loads(data.decode("utf-8")) if data.strip() else None
    except (UnicodeDecodeError, ValueError):
        return {"pid": 0, "host": HOST, "started": "?"}  # garbage: its writer died mid-write
    return info if isinstance(info, dict) else None
