"""A real ``cocorec serve`` process on 127.0.0.1 for the tests that need uvicorn itself (reload, refresh)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(bundle: Path, *args: str, start_timeout: float = 60.0) -> Iterator[tuple[str, dict[str, Any]]]:
    """Start ``cocorec serve --bundle BUNDLE [ARGS]`` on a free port; yield ``(url, first /healthz answer)``;
    stop it (with ``--workers N``: the main process, which stops its workers)."""
    import httpx

    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "cocorec.cli", "serve", "--bundle", str(bundle),
                             "--port", url.rsplit(":", 1)[1], *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + start_timeout
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-500:]
            try:
                first = httpx.get(f"{url}/healthz", timeout=1).json()
                break
            except httpx.HTTPError:
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.2)
        yield url, first
    finally:
        proc.terminate()
        proc.wait(10)
