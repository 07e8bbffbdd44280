"""Who is writing a feature stream: one lock file per (stream, encode worker) naming its owner.

    <cache>/<stream>/.lock-<worker index>   the owner record of pipeline.locks (pid, host, start, command)

A writer of a stream (the encode step, ShardWriter, write_shard, apply_plan) holds the lock of its
worker slot for as long as it writes, so two processes never encode the same stream at once: the
second one stops with one line (a CacheError) naming the pid, host and start time of the first.
Parallel encode workers (``--num-workers-total N --worker-index i``, torchrun) hold different
slots (``.lock-i``), so they still run together; a single writer is slot 0.

Local folders: the lock is a pipeline.locks.OwnerLock, the run folders' lock: an ``flock`` on the
file, which the kernel drops when its process ends in any way (kill -9 included), so a lock left
by a dead process on this machine is free at once; its owner record is still in the file, and the
next writer says it takes it over. What is particular to streams: a lock taken on another machine
(a shared NFS folder whose flock may not cross machines) counts as held only while its file's
mtime, touched every ``HEARTBEAT_S`` by the holder, is younger than ``STALE_AFTER_S``; and a
released lock is an empty file.

Object stores (``s3://``, ``memory://``): best effort. There is no atomic create-if-absent in
fsspec, so the lock is an object (the same owner record) written, then read back to see who won;
two writers starting in the same instant can both get it. Its heartbeat is a time inside the object.

Temp stores carry their writer in their name: ``w<slot>-<pid>@<host>`` (``temp_name``; the slot of
the stream lock held while writing, none for decoded audio). The holder of slot i's lock deletes
slot-i temp stores unconditionally: the lock proves their writer is gone. Any other temp store is
deleted only when its writer looks gone (``writer_gone``) AND it has not changed for
``STALE_AFTER_S``: a pid that looks dead may be alive in another PID namespace with the same host
name (containers sharing the UTS namespace, cloned VMs), so the pid alone is not proof.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
import uuid

from pipeline.errors import CacheError
from pipeline.locks import HOST, STALE_AFTER_S, Owner, OwnerLock, parse_record, refusal, takeover_line

HEARTBEAT_S = 60.0  # how often a holder shows it is alive (well within STALE_AFTER_S)
_TAG = re.compile(r"-(?:w(\d+)-)?(\d+)@([A-Za-z0-9._-]+)-[0-9a-f]{8}(?:\.zarr)?$")
_HINT = "wait for it to finish or stop it, then run this again"


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


def writer_gone(name: str, touched: float | None) -> bool:
    """True when the temp store ``name`` (made with ``temp_name``) is unchanged for ``STALE_AFTER_S``
    and its writer does not look alive (a name without an owner, from an older version: age alone).
    Age as well as liveness: a pid of this host name may live in another PID namespace."""
    if touched is None or time.time() - touched < STALE_AFTER_S:
        return False
    match = _TAG.search(name)
    return match is None or not Owner(int(match.group(2)), match.group(3), touched).alive(touched)


class StreamLock:
    """The lock of one (stream, worker slot) of a cache location (a cache.shards.CacheLocation).

    ``with StreamLock(location, "mert"):`` or ``acquire()`` / ``release()``. Raises CacheError when
    a live process holds it. ``took_over`` is the dead owner whose lock was taken (``note`` is
    given the line that says so).
    """

    def __init__(self, location, stream: str, worker: tuple[int, int] = (0, 1), note=None):
        self.location = location
        self.stream = stream
        self.worker = worker
        self.name = f".lock-{worker[0]}"
        self.path = location.path(stream, self.name)
        self.what = f"feature stream '{stream}' ({location.url_of(stream, self.name)})"
        self.took_over: Owner | None = None
        self._note = note if note is not None else (lambda line: print(f"Note: {line}", file=sys.stderr))
        self._file = (OwnerLock(self.path, self.what, _HINT, error=CacheError, stale_after=STALE_AFTER_S,
                                keep_file=True) if location.local else None)
        self._owner: Owner | None = None  # object stores: the record written (its start time stays)
        self._nonce = uuid.uuid4().hex
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / release -----------------------------------------------------------------------

    def acquire(self) -> "StreamLock":
        if self._held:
            raise RuntimeError(f"{self.path} is already held by this StreamLock")
        if self._file is not None:
            self._file.acquire()
            self.took_over, line = self._file.took_over, self._file.took_over_line
        else:
            line = self._acquire_object()
        if line:
            self._note(f"{line}; its unfinished temp stores are deleted")
        self._held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lock-{self.stream}", daemon=True)
        self._thread.start()
        return self

    def _read_object(self) -> dict | None:
        try:
            return parse_record(self.location.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def _write_object(self) -> None:
        self.location.fs.pipe_file(self.path, self._owner.record(nonce=self._nonce, heartbeat=time.time()))

    def _acquire_object(self) -> str | None:
        """Object stores: the record written and read back; the line saying whose lock was taken, if any."""
        previous = self._read_object()
        owner = Owner.from_record(previous)
        line = None
        if owner is not None:
            if owner.alive(previous.get("heartbeat")):
                raise self._refusal(owner)
            self.took_over, line = owner, takeover_line(self.what, owner, previous.get("heartbeat"))
        self._owner = Owner.me()
        self._write_object()
        winner = self._read_object() or {}
        if winner.get("nonce") != self._nonce:  # another writer wrote after us: it has the lock
            raise self._refusal(Owner.from_record(winner))
        return line

    def _refusal(self, owner: Owner | None) -> CacheError:
        return refusal(self.what, owner, _HINT, self.location.url_of(self.stream, self.name), STALE_AFTER_S,
                       CacheError)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self._file is not None:
                    self._file.touch()
                else:
                    self._write_object()
            except OSError:
                pass  # a missed heartbeat only matters to another machine, after STALE_AFTER_S

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._file is not None:
            self._file.release()
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
