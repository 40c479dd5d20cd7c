"""Worker processes of one service (``cocorec serve --workers N``) that serve one bundle, all of them.

The service's main process starts N spawned processes (and starts another when one dies) that share its
listening socket (:class:`Balancer`); each loads the bundle, runs uvicorn and scores on its own core
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

Connections are spread by :class:`Balancer`: the workers share one listening socket and a worker accepts
only while no live worker holds fewer open connections than it does (least connections, as Envoy's
``exact_balance``). A kept-alive connection stays with its worker, so an uneven split lasts: with a
socket per worker (SO_REUSEPORT) the kernel split 8 connections by a hash of the address, 6 / 2 or worse
in about a third of the tries, and the clients of the busier worker waited twice as long.

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
import socket
import time
from pathlib import Path
from typing import Any, Callable, MutableSequence

from cocorec.serve.queue import _locked
from cocorec.utils.io import atomic_write_json

__all__ = ["ENV", "POLL_S", "RELOAD_TIMEOUT_S", "Balancer", "Fleet"]

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


class Balancer:
    """Accepts the connections of one worker from a listening socket that all workers share, only while
    this worker holds no more open connections than any other live one (least connections).

    ``counts`` is shared by the workers (a ``multiprocessing`` array of ints, one slot each): the open
    connections of the worker of that slot, or -1 for a worker that does not accept (not started yet,
    stopped, or dead: the main process sets it). A worker accepts one connection at a time and counts it
    before it looks again, so no worker ever holds more than one connection above the least loaded.

    Constructor Args:
        sock: the listening socket (non-blocking once started).
        counts: the shared slots.
        index: this worker's slot.
        nap: seconds between looks while another worker is less loaded (connections wait in the backlog).

    Example:
        >>> import asyncio, socket
        >>> async def two_workers():
        ...     sock = socket.create_server(("127.0.0.1", 0))
        ...     counts = [-1, -1]
        ...     a, b = Balancer(sock, counts, 0), Balancer(sock, counts, 1)
        ...     a.start(asyncio.Protocol); b.start(asyncio.Protocol)
        ...     opened = [await asyncio.open_connection(*sock.getsockname()) for _ in range(5)]
        ...     while sum(counts) < 5:
        ...         await asyncio.sleep(0.01)
        ...     seen = sorted(counts)
        ...     for _, w in opened:
        ...         w.close()
        ...     await a.stop(); await b.stop(); sock.close()
        ...     return seen
        >>> asyncio.run(two_workers())
        [2, 3]
    """

    def __init__(self, sock: socket.socket, counts: MutableSequence[int], index: int, nap: float = 0.005) -> None:
        self.sock, self.counts, self.index, self.nap = sock, counts, index, nap
        self._task: asyncio.Task[None] | None = None

    def least(self) -> bool:
        """Whether this worker holds no more connections than any live worker."""
        mine = self.counts[self.index]
        return all(c < 0 or mine <= c for c in self.counts)

    def start(self, protocol: type[asyncio.Protocol], **kwargs: Any) -> None:
        """Accept from now on (in the running event loop), each connection served by ``protocol(**kwargs)``."""
        balancer = self

        def connection_lost(proto: asyncio.Protocol, exc: Exception | None) -> None:
            balancer.counts[balancer.index] -= 1
            protocol.connection_lost(proto, exc)

        counted = type(f"Counted{protocol.__name__}", (protocol,), {"connection_lost": connection_lost})
        self.sock.setblocking(False)
        self.counts[self.index] = 0
        self._task = asyncio.get_running_loop().create_task(self._accept(lambda: counted(**kwargs)))

    async def stop(self) -> None:
        """Accept no more (connections already accepted stay open)."""
        self.counts[self.index] = -1
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _readable(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Until the socket has a connection waiting, or ``timeout`` (the other workers' counts move)."""
        done = loop.create_future()

        def wake() -> None:
            if not done.done():
                done.set_result(None)

        fd = self.sock.fileno()
        loop.add_reader(fd, wake)
        timer = loop.call_later(timeout, wake)
        try:
            await done
        finally:
            loop.remove_reader(fd)
            timer.cancel()

    async def _accept(self, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.least():
                await asyncio.sleep(self.nap)
                continue
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):   # none waiting, or another worker took it
                await self._readable(loop, 4 * self.nap)
                continue
            except OSError:   # e.g. out of file descriptors: look again later, the connection waits
                await asyncio.sleep(self.nap)
                continue
            self.counts[self.index] += 1
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # small answers go out at once
            try:
                await loop.connect_accepted_socket(protocol_factory, conn)
            except OSError:   # the client left before it was served
                self.counts[self.index] -= 1
                conn.close()
