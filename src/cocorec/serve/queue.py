"""The near-line queue: users the service scored without their own knowledge, for a knowledge refresh.

A JSON-lines file next to the bundle (``<bundle>.queue.jsonl``; ``--queue`` to put it elsewhere), one
line per queued user with the profile and history the request carried::

    {"user": "u77", "profile": {"gender": "F"}, "history": [["242", 5], ["302", 2]], "kind": "new", "at": ...}

``kind`` is ``new`` (a user the bundle does not know) or ``changed`` (a known user whose request carried
a profile or history other than the bundle's). The service appends (:meth:`UserQueue.add`: one line per
user id while it is queued, at most ``max_users`` users, the first request's profile and history);
``cocorec knowledge refresh`` reads a snapshot (:func:`snapshot`), computes those users' knowledge, and
then drops the lines it read (:func:`consume`) - lines appended meanwhile stay. Both sides hold an
exclusive ``flock`` on ``<queue>.lock`` while they touch the file, so a reader never sees half a line
and a rewrite never loses an append. The file outlives the service: a restarted service reads the
user ids back and does not queue them twice.

Example:
    >>> import tempfile, pathlib
    >>> q = UserQueue(pathlib.Path(tempfile.mkdtemp()) / "q.jsonl")
    >>> q.add("u1", {"gender": "F"}, [("242", 5)]), q.add("u1", None, None)
    (True, False)
    >>> entries, offset = snapshot(q.path)
    >>> entries["u1"]["history"], consume(q.path, offset)
    ([['242', 5]], 0)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["UserQueue", "consume", "default_queue_path", "snapshot"]

MAX_USERS = 100_000


def default_queue_path(bundle: str | Path) -> Path:
    """``<bundle>.queue.jsonl`` beside the bundle directory (a refresh replaces the directory whole)."""
    b = Path(bundle)
    return b.with_name(b.name + ".queue.jsonl")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _parse(blob: bytes, where: Path) -> dict[str, dict[str, Any]]:
    """user id -> its latest entry; a line that is not an entry is skipped (an old damaged tail)."""
    out: dict[str, dict[str, Any]] = {}
    for line in blob.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and isinstance(e.get("user"), str):
            out.pop(e["user"], None)   # keep the order of the latest line
            out[e["user"]] = e
    return out


def snapshot(path: str | Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(user id -> latest entry, in queue order; the byte offset read up to) of the queue at ``path``."""
    path = Path(path)
    with _locked(path):
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return {}, 0
    return _parse(blob, path), len(blob)


def consume(path: str | Path, offset: int) -> int:
    """Drop the first ``offset`` bytes of the queue (what a snapshot read); returns how many lines stay."""
    path = Path(path)
    with _locked(path):
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return 0
        rest = blob[offset:]
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_bytes(rest)
        os.replace(tmp, path)
    return len(rest.splitlines())


class UserQueue:
    """The service's side of the queue: appends a user once while it is queued (bounded).

    Constructor Args:
        path: the JSON-lines file (created on the first append).
        max_users: at most this many users queued; later ones are scored but not queued (``dropped``).
    """

    def __init__(self, path: str | Path, max_users: int = MAX_USERS) -> None:
        self.path, self.max_users = Path(path), int(max_users)
        self.ids: set[str] = set()
        self.dropped = 0
        self._read: tuple[int | None, int] = (None, 0)   # (inode, bytes) of the file read into ids
        self.resync()

    def resync(self) -> None:
        """Read the queued ids back from the file (at start, and after a refresh consumed some)."""
        with _locked(self.path):
            self._catch_up(full=True)

    def sync(self) -> None:
        """Add the ids other processes appended since the last read (the other workers of the service)."""
        with _locked(self.path):
            self._catch_up()

    def _catch_up(self, full: bool = False) -> None:
        # under the lock: a replaced file (a refresh consumed it) is read whole, a grown one from where we were
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                ino, at = self._read
                if full or st.st_ino != ino or st.st_size < at:
                    self.ids, at = set(), 0
                elif st.st_size == at:
                    return
                f.seek(at)
                blob = f.read()
        except FileNotFoundError:
            self.ids, self._read = set(), (None, 0)
            return
        self.ids.update(_parse(blob, self.path))
        self._read = (st.st_ino, at + len(blob))

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, user: str, profile: Mapping[str, str] | None, history: Sequence[tuple[str, int]] | None,
            kind: str = "new") -> bool:
        """Queue ``user`` with what its request carried; False if it is queued already (by this process or
        another worker of the service) or the queue is full."""
        if user in self.ids:
            return False
        line = json.dumps({"user": user, "profile": dict(profile or {}),
                           "history": [[str(i), int(r)] for i, r in (history or [])], "kind": kind,
                           "at": round(time.time(), 3)}, separators=(",", ":")) + "\n"
        with _locked(self.path):
            self._catch_up()
            if user in self.ids:
                return False
            if len(self.ids) >= self.max_users:
                self.dropped += 1
                return False
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
            self._catch_up()
        return True
