"""Load test of ``cocorec serve``: bundles side by side, 100-candidate requests at 1 / 8 / 32 clients.

Starts one real uvicorn process per bundle on 127.0.0.1 (``cocorec serve``; stopped at the end, also
on error), waits for ``/healthz``, then for each concurrency level runs rounds that alternate between
the bundles (A, B, A, B, ...: a change in the box's load hits both alike) with an asyncio httpx
client: ``clients`` workers, each sending its next request when the last one is answered. Bounded
in count (``--requests`` per bundle and level) and in time (``--max-seconds`` per round). Every
request is a known user (drawn at random) with ``--candidates`` random items of the bundle.

Prints one table: per bundle and level, requests, errors, throughput, p50 / p99 / max latency
(client side: the whole HTTP round trip), the ratio of p99 of each bundle to the first one's, from
the server's /metrics its mean latency (request in to answer out) and requests per model pass, and the
CPU time per request of the server process (all its threads, from /proc) and of the client. CPU time
per request moves far less than latency with the load of a shared box: it is the figure to compare.
The client runs on the same machine as the servers: on a 2-core box it takes a share of the CPU
(``--client raw``: a minimal HTTP/1.1 keep-alive client on asyncio streams, a fraction of httpx's CPU).

The same bundle may be served twice by different code, side by side in one run: ``--pythonpath
NAME=DIR`` puts DIR first on that server's PYTHONPATH (an older checkout's ``src``: before/after a
change; a directory with httptools and uvloop, which uvicorn then uses instead of h11 and asyncio).

    python benchmarks/bench_serve.py --bundle base=bundles/din-base --bundle coco=bundles/din-coco
    python benchmarks/bench_serve.py --bundle before=B --bundle after=B --pythonpath before=/tmp/old/src

``--workers N`` (or ``NAME=N``): that many uvicorn worker processes per server (the server CPU then
sums the process tree); ``--ref NAME=REF``: the p99 ratio of NAME is to REF's (default: to the first).
Several servers of one bundle side by side (``--bundle one=B --bundle two=B --workers two=2 --ref
two=one``) compare 1 and 2 workers within one run.

``--refresh-users N``: then, on a copy of the first bundle served by its own process, queue N new users
(a random profile and a 20-item rated history each) and keep ``max(--clients)`` clients scoring (every
fourth request one of the new users) while ``cocorec knowledge refresh --bundle COPY --reload URL`` runs
with the run's LM: prints the requests and errors during the refresh, its wall time, and how the new
users were answered (fallback before the swap, known after). ``--clients ''`` skips the levels.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, port: int, threads: int, log: Path, pythonpath: str | None = None,
                 workers: int | None = None, model_threads: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cocorec.cli", "serve", "--bundle", bundle, "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(threads)] + (["--workers", str(workers)] if workers else [])
    cmd += ["--model-threads", str(model_threads)] if model_threads else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (``--workers``), all their threads, of
    the processes alive now (Linux /proc; NaN elsewhere)."""
    try:
        parent: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    parent[int(d)] = int(_stat(int(d))[1])
                except (OSError, ValueError, IndexError):
                    continue
        tree, grew = {pid}, True
        while grew:
            more = {p for p, pp in parent.items() if pp in tree} - tree
            tree |= more
            grew = bool(more)
        total = 0.0
        for p in tree:
            try:
                fields = _stat(p)
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            r = httpx.get(f"{url}/healthz", timeout=2.0)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def server_side(url: str) -> tuple[float, float, float]:
    """(sum of /score latencies in s, their count, model passes) from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    got = {"sum": 0.0, "count": 0.0, "passes": 0.0}
    for line in text.splitlines():
        if line.startswith('cocorec_request_latency_seconds_sum{endpoint="/score"}'):
            got["sum"] = float(line.split()[-1])
        elif line.startswith('cocorec_request_latency_seconds_count{endpoint="/score"}'):
            got["count"] = float(line.split()[-1])
        elif line.startswith("cocorec_model_passes "):
            got["passes"] = float(line.split()[-1])
    return got["sum"], got["count"], got["passes"]


def bodies(bundle: str, n: int, candidates: int, seed: int) -> list[bytes]:
    ids = json.loads((Path(bundle) / "ids.json").read_text())
    rng = random.Random(seed)
    k = min(candidates, len(ids["items"]))
    return [json.dumps({"user": rng.choice(ids["users"]), "items": rng.sample(ids["items"], k)}).encode()
            for _ in range(n)]


async def raw_load(url: str, reqs: list[bytes], clients: int, max_seconds: float) -> tuple[list[float], int, float]:
    """As :func:`load`, with one keep-alive HTTP/1.1 connection per worker on asyncio streams (no httpx)."""
    host, port = url.removeprefix("http://").split(":")
    lat: list[float] = []
    errors = 0
    it = iter(reqs)
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for body in it:
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                ok = False
                try:
                    writer.write(b"POST /score HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.split(b"\r\n")
                    size = next(int(v) for k, _, v in (x.partition(b":") for x in lines[1:])
                                if k.strip().lower() == b"content-length")
                    answer = await reader.readexactly(size)
                    ok = lines[0].split()[1] == b"200" and len(json.loads(answer)["scores"]) > 0
                except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError, KeyError):
                    ok = False
                lat.append(time.perf_counter() - t0)
                errors += not ok
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return lat, errors, time.perf_counter() - t0


async def load(url: str, reqs: list[bytes], clients: int, max_seconds: float) -> tuple[list[float], int, float]:
    """Latencies (s) of the answered requests, errors, wall seconds."""
    lat: list[float] = []
    errors = 0
    it = iter(reqs)
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0,
                                 headers={"content-type": "application/json"}) as client:
        async def worker() -> None:
            nonlocal errors
            for body in it:
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post("/score", content=body)
                    ok = r.status_code == 200 and len(r.json()["scores"]) > 0
                except httpx.HTTPError:
                    ok = False
                lat.append(time.perf_counter() - t0)
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return lat, errors, wall


def refresh_under_load(bundle: str, clients: int, n_new: int, candidates: int, threads: int,
                       seed: int = 0) -> dict:
    """See the module: a knowledge refresh of ``n_new`` queued users under load, on a copy of ``bundle``."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-refresh-"))
    copy = tmp / "bundle"
    shutil.copytree(bundle, copy)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(str(copy), port, threads, tmp / "server.log")
    try:
        info = wait_ready(url, proc)
        ids = json.loads((copy / "ids.json").read_text())
        rng = random.Random(seed)
        k = min(candidates, len(ids["items"]))
        new = [{"user": f"bench-new-{seed}-{j}", "items": rng.sample(ids["items"], k),
                "profile": {f: rng.choice(v) for f, v in info["profile_fields"].items() if v},
                "history": [{"item": i, "rating": rng.randint(1, 5)} for i in rng.sample(ids["items"], 20)]}
               for j in range(n_new)]
        for body in new:   # queued now, with their profile and history
            assert httpx.post(f"{url}/score", json=body, timeout=30).json()["user_known"] is False
        known = [{"user": rng.choice(ids["users"]), "items": rng.sample(ids["items"], k)} for _ in range(200)]
        mixed = [new[j % n_new] if j % 4 == 3 else known[j] for j in range(len(known))]
        stop = threading.Event()
        seen: list[tuple[bool, int, bool | None, float]] = []   # (new user, status, user_known, seconds)

        async def go() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
                async def worker(w: int) -> None:
                    j = w
                    while not stop.is_set():
                        body = mixed[j % len(mixed)]
                        j += clients
                        t0 = time.perf_counter()
                        try:
                            r = await client.post("/score", json=body)
                            seen.append((body in new, r.status_code, r.json().get("user_known"),
                                         time.perf_counter() - t0))
                        except httpx.HTTPError:
                            seen.append((body in new, 0, None, time.perf_counter() - t0))
                await asyncio.gather(*(worker(w) for w in range(clients)))

        loader = threading.Thread(target=lambda: asyncio.run(go()))
        loader.start()
        time.sleep(2.0)
        t0 = time.perf_counter()
        ref = subprocess.run([sys.executable, "-m", "cocorec.cli", "knowledge", "refresh", "--bundle", str(copy),
                              "--reload", url], capture_output=True, text=True)
        refresh_s = time.perf_counter() - t0
        time.sleep(2.0)
        stop.set()
        loader.join(120)
        after = [httpx.post(f"{url}/score", json=body, timeout=30).json()["user_known"] for body in new]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    ms = np.array([x[3] for x in seen]) * 1e3
    out = {"clients": clients, "new_users": n_new, "requests": len(seen), "errors": sum(x[1] != 200 for x in seen),
           "refresh_rc": ref.returncode, "refresh_seconds": refresh_s,
           "new_answered_fallback": sum(x[0] and x[2] is False for x in seen),
           "new_answered_known": sum(x[0] and x[2] is True for x in seen),
           "known_after": sum(after), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
           "refresh_tail": (ref.stdout + ref.stderr).strip().splitlines()[-2:]}
    print(f"refresh under load: {out['requests']} requests, {out['errors']} errors; refresh of {n_new} users "
          f"rc={ref.returncode} in {refresh_s:.1f} s; new users answered {out['new_answered_fallback']}x with the "
          f"fallback, {out['new_answered_known']}x known; {out['known_after']}/{n_new} known after; "
          f"p50={out['p50_ms']:.1f} ms p99={out['p99_ms']:.1f} ms ({clients} clients)", flush=True)
    for line in out["refresh_tail"]:
        print(f"  refresh: {line}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", action="append", required=True, help="NAME=DIR (repeat; the first is the reference)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=600, help="measured requests per bundle and level")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the bundles per level")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="time cap of one round")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--pythonpath", action="append", default=[],
                    help="NAME=DIR: first on the PYTHONPATH of that bundle's server (other code, side by side)")
    ap.add_argument("--client", choices=["httpx", "raw"], default="httpx",
                    help="httpx.AsyncClient, or a minimal keep-alive HTTP/1.1 client on asyncio streams")
    ap.add_argument("--workers", action="append", default=[],
                    help="N (every server) or NAME=N (that bundle's server): cocorec serve --workers "
                         "(default: the command's own default)")
    ap.add_argument("--model-threads", action="append", default=[],
                    help="N or NAME=N: cocorec serve --model-threads (passes at once in a process)")
    ap.add_argument("--ref", action="append", default=[],
                    help="NAME=REF: the p99 ratio of bundle NAME is to bundle REF's (default: to the first)")
    ap.add_argument("--refresh-users", type=int, default=0,
                    help="then: a refresh of this many queued users under load (on a copy of the first bundle)")
    args = ap.parse_args()
    named = [b.split("=", 1) for b in args.bundle]
    paths = dict(x.split("=", 1) for x in args.pythonpath)
    refs = dict(x.split("=", 1) for x in args.ref)
    every = next((int(w) for w in args.workers if "=" not in w), None)
    workers = {name: every for name, _ in named}
    workers.update({k: int(v) for k, v in (w.split("=", 1) for w in args.workers if "=" in w)})
    every = next((int(w) for w in args.model_threads if "=" not in w), None)
    mthreads = {name: every for name, _ in named}
    mthreads.update({k: int(v) for k, v in (w.split("=", 1) for w in args.model_threads if "=" in w)})
    run_load = raw_load if args.client == "raw" else load
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    procs, urls = {}, {}
    try:
        for name, path in named:
            port = free_port()
            procs[name] = start_server(path, port, args.threads, logdir / f"{name}.log", paths.get(name),
                                       workers[name], mthreads[name])
            urls[name] = f"http://127.0.0.1:{port}"
        info = {name: wait_ready(urls[name], procs[name]) for name, _ in named}
        rows = []
        for c in levels:
            per = max(1, args.requests // args.rounds)
            res = {name: ([], 0, 0.0) for name, _ in named}
            cpu = {name: [0.0, 0.0] for name, _ in named}   # server, client CPU seconds in the measured rounds
            for name, path in named:   # warm-up
                asyncio.run(run_load(urls[name], bodies(path, args.warmup, args.candidates, 1), c, args.max_seconds))
            before = {name: server_side(urls[name]) for name, _ in named}
            for r in range(args.rounds):
                order = named if r % 2 == 0 else named[::-1]
                for name, path in order:
                    reqs = bodies(path, per, args.candidates, 100 * c + r)
                    s0, c0 = cpu_seconds(procs[name].pid), time.process_time()
                    lat, err, wall = asyncio.run(run_load(urls[name], reqs, c, args.max_seconds))
                    cpu[name][0] += cpu_seconds(procs[name].pid) - s0
                    cpu[name][1] += time.process_time() - c0
                    a, e, w = res[name]
                    res[name] = (a + lat, e + err, w + wall)
            p99s = {name: float(np.percentile(np.array(res[name][0]) * 1e3, 99)) for name, _ in named}
            for name, _ in named:
                lat, err, wall = res[name]
                after = server_side(urls[name])
                n_server = max(after[1] - before[name][1], 1.0)
                server_ms = (after[0] - before[name][0]) / n_server * 1e3
                per_pass = n_server / max(after[2] - before[name][2], 1.0)
                ms = np.array(lat) * 1e3
                p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
                ref_p99 = p99s[refs.get(name, named[0][0])]
                n_workers = workers[name] or min(2, os.cpu_count() or 1)   # else cocorec serve's default
                rows.append({"bundle": name, "method": info[name]["method"], "workers": n_workers,
                             "model_threads": 1 if mthreads[name] is None else mthreads[name],
                             "ref": refs.get(name, named[0][0]), "clients": c, "requests": len(lat),
                             "errors": err, "req_per_s": len(lat) / wall, "p50_ms": p50, "p99_ms": p99,
                             "max_ms": float(ms.max()), "p99_vs_first": p99 / ref_p99,
                             "server_mean_ms": server_ms, "requests_per_pass": per_pass,
                             "server_cpu_ms": cpu[name][0] / max(len(lat), 1) * 1e3,
                             "client_cpu_ms": cpu[name][1] / max(len(lat), 1) * 1e3})
                print(f"{name:>8} clients={c:>3} n={len(lat):>5} errors={err} {len(lat) / wall:8.1f} req/s "
                      f"p50={p50:6.2f} ms p99={p99:6.2f} ms max={ms.max():7.2f} ms p99/ref={p99 / ref_p99:.2f} "
                      f"server mean={server_ms:.2f} ms requests/pass={per_pass:.1f} "
                      f"CPU/request server={rows[-1]['server_cpu_ms']:.2f} ms "
                      f"client={rows[-1]['client_cpu_ms']:.2f} ms",
                      flush=True)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), load average {os.getloadavg()[0]:.1f} at the end, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.candidates} candidates a request, "
          f"{args.threads} torch thread(s) per server, {args.client} client\n")
    print("| bundle | workers x model threads | clients | requests | errors | req/s | p50 ms | p99 ms | max ms "
          "| p99 / ref | server mean ms | requests / pass | server CPU ms / req | client CPU ms / req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['bundle']} ({r['method']}) | {r['workers']} x {r['model_threads']} | {r['clients']} | "
              f"{r['requests']} | {r['errors']} | "
              f"{r['req_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{r['p99_vs_first']:.2f} ({r['ref']}) | {r['server_mean_ms']:.1f} | {r['requests_per_pass']:.1f} | "
              f"{r['server_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} |")
    refresh = None
    if args.refresh_users:
        refresh = refresh_under_load(named[0][1], max(levels or [8]), args.refresh_users, args.candidates,
                                     args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps({"levels": rows, "refresh": refresh}, indent=2))
    bad = any(r["errors"] for r in rows) or (refresh is not None and (refresh["errors"] or refresh["refresh_rc"]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
