"""Worker processes of one service (``cocorec serve --workers N``) that serve one bundle, all of them.

The service's main process starts N spawned processes (and starts another when one dies), each with
its own SO_REUSEPORT socket on the port; each loads the bundle, runs uvicorn and scores on its own core
(one process saturates one core: the Python around the model pass holds one interpreter). What one
worker is asked must reach every worker, through a state directory the main process creates (and
removes at exit):

* ``generation.json``: ``{"generation": g, "bundle_id": ...}``, the bundle the service serves, written
  atomically under ``generation.json.lock`` (:meth:`Fleet.publish`); each worker polls it every ``POLL_S``
  (one ``stat`` while it does not move) and, when ``g`` moves past its own, loads the bundle directory
  again and swaps it in whole, as ``POST /reload`` does in a single process;
* ``worker-<pid>.json``: what each worker serves (generation, bundle id, or the error that kept it on
  the old bundle), written at start and after every swap (:meth:`Fleet.ack`), removed at exit;
* ``metrics/``: prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``): ``/metrics``
  answered by any worker counts the requests of all of them.

``POST /reload``, answered by one worker: it loads the new bundle (a bundle that cannot be read: 409,
nothing is published and every worker keeps the old one), publishes it, and answers only once every
live worker reports the new generation (:meth:`Fleet.wait`; a worker's own load failing is a 409 naming
it; none within ``RELOAD_TIMEOUT_S``: 504). So a request that starts after ``/reload`` has answered is
never scored by the old bundle; requests in flight meanwhile finish on the bundle they started with.
A worker that starts (or that uvicorn restarts after a crash) reads the published generation and
reports it before it reads the bundle directory, so a reload published meanwhile waits for it too.

Example:
    >>> import tempfile
    >>> fleet = Fleet(tempfile.mkdtemp())
    >>> fleet.published()
    (0, None)
    >>> g = fleet.publish("b1"); fleet.ack(g, "b1"); fleet.published(), list(fleet.workers().values())[0]["bundle_id"]
    ((1, 'b1'), 'b1')
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from cocorec.serve.queue import _locked
from cocorec.utils.io import atomic_write_json

__all__ = ["ENV", "POLL_S", "RELOAD_TIMEOUT_S", "Fleet"]

ENV = "COCOREC_SERVE_WORKER"     # the worker settings (JSON) the main process hands to its workers
POLL_S = 0.05                    # how often a worker looks at the published generation
RELOAD_TIMEOUT_S = 120.0         # a reload answers 504 when a worker has not switched by then


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a worker that died and is not reaped yet is a zombie: not serving
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Fleet:
    """One worker's view of the service's state directory (see the module).

    Constructor Args:
        state_dir: the directory the service's main process made for its workers.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.pid = os.getpid()
        self._gen = self.dir / "generation.json"
        self._seen: tuple[int, int, int] | None = None
        self._last: tuple[int, str | None] = (0, None)
        # read, and said, before this worker loads the bundle: a reload published from now on waits for
        # this worker, and one published before it found the new bundle on disk already
        self.generation = self.published()[0]
        self.ack(self.generation, None)

    def published(self) -> tuple[int, str | None]:
        """(generation, bundle id) last published; (0, None) before the first reload."""
        try:
            st = os.stat(self._gen)
        except FileNotFoundError:
            return 0, None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._seen:   # replaced by a rename: read it, else keep what was read
            try:
                blob = json.loads(self._gen.read_text())
                self._last = (int(blob["generation"]), blob.get("bundle_id"))
                self._seen = key
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return self._last

    def publish(self, bundle_id: str | None) -> int:
        """Make ``bundle_id`` the bundle every worker serves; returns its generation."""
        with _locked(self._gen):
            self._seen = None
            gen = self.published()[0] + 1
            atomic_write_json(self._gen, {"generation": gen, "bundle_id": bundle_id, "by": self.pid,
                                          "at": round(time.time(), 3)}, indent=None)
        return gen

    def ack(self, generation: int, bundle_id: str | None, error: str | None = None) -> None:
        """Say what this worker serves now (``error``: why it stays on its old bundle)."""
        atomic_write_json(self.dir / f"worker-{self.pid}.json",
                          {"pid": self.pid, "generation": generation, "bundle_id": bundle_id, "error": error},
                          indent=None)

    def workers(self) -> dict[int, dict[str, Any]]:
        """pid -> the last ack of every live worker (the files of dead ones are removed)."""
        out: dict[int, dict[str, Any]] = {}
        for p in self.dir.glob("worker-*.json"):
            try:
                pid = int(p.stem.split("-", 1)[1])
            except ValueError:
                continue
            if not _alive(pid):
                p.unlink(missing_ok=True)
                continue
            try:
                out[pid] = json.loads(p.read_text())
            except (OSError, ValueError):   # gone between the listing and the read
                continue
        return out

    async def wait(self, generation: int, timeout: float = RELOAD_TIMEOUT_S) -> dict[int, dict[str, Any]]:
        """The acks of every live worker once all of them report ``generation`` (or a later one); a
        TimeoutError naming the workers that did not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            acks = self.workers()
            late = sorted(pid for pid, a in acks.items() if int(a.get("generation", 0)) < generation)
            if not late:
                return acks
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker(s) {', '.join(map(str, late))} did not load generation {generation} "
                                   f"within {timeout:.0f} s")
            await asyncio.sleep(POLL_S / 2)

    def leave(self) -> None:
        """This worker stops serving (its ack file goes)."""
        (self.dir / f"worker-{self.pid}.json").unlink(missing_ok=True)
