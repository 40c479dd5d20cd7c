"""``cocorec serve --workers 2``: real uvicorn worker processes on 127.0.0.1. A ``/reload`` answered by one
worker makes every worker serve the new bundle before it returns (no request after it gets an answer of
the old bundle, on any worker); ``/metrics`` of any worker counts the requests of all; bad requests are
still a 4xx with a one-line reason; a user queued by one worker is not queued again by the other."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cocorec.serve.bundle import BundleScorer, export_bundle
from cocorec.serve.fleet import Fleet
from cocorec.serve.queue import UserQueue, default_queue_path, snapshot
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig
from tests.conftest import write_generic
from tests.serve.live import live_server


@pytest.fixture(scope="module")
def bundle_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("workers")
    toy = write_generic(base / "toy", n_users=30, n_items=20, per_user=12, seed=5)
    run(RunConfig(dataset=str(toy), backbone="din", method="base", seed=0, output=str(base / "run"), results=None,
                  quiet=True, train=TrainConfig(epochs=1, batch_size=64, threads=1), model={"hidden_units": (16,)}))
    export_bundle(base / "run", base / "bundle")
    return base / "bundle"


def _variant(path: Path, new_user: str) -> None:
    """Replace the bundle at ``path`` (a rename, as an export or a refresh does) by another export: one more
    user (``new_user``, a copy of user 0's row), the output bias moved (every score changes), a new id."""
    from cocorec.train.trainer import load_safetensors
    from cocorec.utils.io import atomic_replace_dir, atomic_write_json, save_safetensors_atomic

    cfg = json.loads((path / "bundle.json").read_text())
    ids = json.loads((path / "ids.json").read_text())
    new_id = uuid.uuid4().hex
    model = load_safetensors(path / "model.safetensors")
    name = [k for k, v in model.items() if k.endswith("bias") and v.numel() == 1][-1]
    model[name] = model[name] + 0.5
    tables = {k: v.clone() for k, v in load_safetensors(path / "tables.safetensors").items()}
    grown = ["user_feats", "user_hist_items", "user_hist_ratings"]
    grown += [f"knowledge/{j}" for j, f in enumerate(cfg["knowledge"]) if f["key"] == "user"]
    for k in grown:
        tables[k] = torch.cat([tables[k], tables[k][:1]]).contiguous()
    tmp = path.with_name(path.name + ".tmp-variant")
    tmp.mkdir()
    save_safetensors_atomic(model, tmp / "model.safetensors", {"bundle_id": new_id})
    save_safetensors_atomic(tables, tmp / "tables.safetensors", {"bundle_id": new_id})
    atomic_write_json(tmp / "ids.json", {**ids, "bundle_id": new_id, "users": ids["users"] + [new_user]})
    atomic_write_json(tmp / "bundle.json", {**cfg, "id": new_id, "n_users": cfg["n_users"] + 1})
    atomic_replace_dir(tmp, path)


def _one_client_per_worker(url: str, workers: int = 2, headers: dict | None = None) -> dict[int, httpx.Client]:
    """A kept-alive connection to each worker (a connection stays with the worker that accepted it)."""
    conns: dict[int, httpx.Client] = {}
    for _ in range(200):
        c = httpx.Client(base_url=url, timeout=60, headers=headers or {})
        pid = c.get("/healthz").json()["pid"]
        if pid in conns:
            c.close()
        else:
            conns[pid] = c
        if len(conns) == workers:
            return conns
    raise AssertionError(f"only workers {sorted(conns)} accepted 200 connections")


def test_a_reload_reaches_every_worker_before_it_answers(bundle_dir, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(bundle_dir, path)
    old = BundleScorer(path)
    items = old.item_ids[:8]
    known = {"user": old.user_ids[1], "items": items}
    late = {"user": "late", "items": items}
    want_old = old.score(known["user"], items).scores
    with live_server(path, "--workers", "2") as (url, first):
        conns = _one_client_per_worker(url)
        for c in conns.values():
            np.testing.assert_allclose(c.post("/score", json=known).json()["scores"], want_old, rtol=0, atol=1e-6)
            assert c.post("/score", json=late).json()["user_known"] is False
        answers: list[tuple[int, list]] = []
        stop = threading.Event()

        def load() -> None:   # new connections all along: both workers score while the reload runs
            while not stop.is_set():
                r = httpx.post(f"{url}/score", json=known, timeout=60)
                answers.append((r.status_code, r.json().get("scores")))

        loaders = [threading.Thread(target=load) for _ in range(2)]
        for t in loaders:
            t.start()
        _variant(path, "late")
        new = BundleScorer(path)
        want_new = new.score(known["user"], items).scores
        assert not np.allclose(want_new, want_old, rtol=0, atol=1e-4)
        r = httpx.post(f"{url}/reload", timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["workers"] == 2 and r.json()["bundle_id"] == new.id != first["bundle_id"]
        # every worker, on the connection it kept since before the reload: the new bundle only
        for c in conns.values():
            h = c.get("/healthz").json()
            assert h["bundle_id"] == new.id and h["users"] == len(old.user_ids) + 1
            np.testing.assert_allclose(c.post("/score", json=known).json()["scores"], want_new, rtol=0, atol=1e-6)
            assert c.post("/score", json=late).json()["user_known"] is True
        stop.set()
        for t in loaders:
            t.join(60)
        for c in conns.values():
            c.close()
    assert len(answers) >= 4 and all(code == 200 for code, _ in answers)
    for _, scores in answers:   # each request on one bundle or the other, never a mix
        assert np.allclose(scores, want_old, rtol=0, atol=1e-6) or np.allclose(scores, want_new, rtol=0, atol=1e-6)


def test_metrics_count_every_worker_bad_requests_are_one_line_and_a_user_is_queued_once(bundle_dir, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(bundle_dir, path)
    b = BundleScorer(path, jit=False)
    key = {"X-API-Key": "k3y"}
    body = {"user": b.user_ids[2], "items": b.item_ids[:5]}
    with live_server(path, "--workers", "2", "--api-key", "k3y", "--max-candidates", "10") as (url, _):
        conns = _one_client_per_worker(url, headers=key)
        sent = {pid: 3 + k for k, pid in enumerate(conns)}   # 3 on one worker, 4 on the other
        for pid, c in conns.items():
            for _ in range(sent[pid]):
                assert c.post("/score", json=body).status_code == 200
        for c in conns.values():   # every worker checks as one process did
            r = c.post("/score", json={"user": b.user_ids[0], "items": [str(i) for i in range(11)]})
            assert r.status_code == 422 and r.json()["detail"] == "items: at most 10 entries"
            r = c.post("/score", content=b"{oops", headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["detail"] == "the body is not valid JSON"
            r = c.post("/recommend", json={**body, "k": 0})
            assert r.status_code == 422 and r.json()["detail"].startswith("k:") and "\n" not in r.json()["detail"]
            r = httpx.post(f"{url}/score", json=body)
            assert r.status_code == 401 and r.json()["detail"] == "missing X-API-Key header"
            assert c.get("/score").status_code == 405
            # the same walk-in user on both workers: queued once
            assert c.post("/score", json={"user": "walk-in", "items": b.item_ids[:2]}).json()["user_known"] is False
        texts = [c.get("/metrics").text for c in conns.values()]
        for c in conns.values():
            c.close()
    total = sum(sent.values()) + 2   # + the walk-in user's requests
    for text in texts:   # either worker's scrape: the requests of both
        assert f'cocorec_requests_total{{code="200",endpoint="/score"}} {float(total)}' in text
        assert 'cocorec_errors_total{code="422",endpoint="/score"} 2.0' in text
        assert 'cocorec_errors_total{code="400",endpoint="/score"} 2.0' in text
        assert 'cocorec_errors_total{code="422",endpoint="/recommend"} 2.0' in text
        assert f'cocorec_request_latency_seconds_count{{endpoint="/score"}} {float(total + 8)}' in text
        assert 'cocorec_knowledge_lookups_total{result="fallback"} 2.0' in text
        assert 'cocorec_queued_users_total{kind="new"} 1.0' in text and "cocorec_unknown_users 1.0" in text
    assert list(snapshot(default_queue_path(path))[0]) == ["walk-in"]
    assert len(default_queue_path(path).read_text().splitlines()) == 1


def test_two_queues_on_one_file_append_a_user_once_and_follow_a_consume(tmp_path):
    from cocorec.serve.queue import consume

    q1, q2 = UserQueue(tmp_path / "q.jsonl"), UserQueue(tmp_path / "q.jsonl")   # two worker processes
    assert q1.add("u1", {"gender": "F"}, [("i1", 4)])
    assert not q2.add("u1", None, None) and "u1" in q2.ids
    assert q2.add("u2", None, None)
    q1.sync()
    assert q1.ids == {"u1", "u2"} and len(q1.path.read_text().splitlines()) == 2
    consume(q1.path, q1.path.stat().st_size)   # a refresh took both (then each worker resyncs on /reload)
    q2.sync()
    assert q2.ids == set() and q2.add("u1", None, None)   # queued again: the file was replaced
    q1.sync()
    assert q1.ids == {"u1"}


def test_fleet_forgets_dead_workers_and_waits_for_a_late_one(tmp_path):
    import asyncio

    fleet = Fleet(tmp_path)
    assert set(fleet.workers()) == {os.getpid()}
    dead = 2 ** 22 + 17   # above the kernel's pid limit: never a live process
    (tmp_path / f"worker-{dead}.json").write_text(json.dumps({"pid": dead, "generation": 0}))
    assert set(fleet.workers()) == {os.getpid()} and not (tmp_path / f"worker-{dead}.json").exists()
    gen = fleet.publish("b2")
    with pytest.raises(TimeoutError, match=f"worker\\(s\\) {os.getpid()} did not load generation {gen}"):
        asyncio.run(fleet.wait(gen, timeout=0.2))
    fleet.ack(gen, "b2")
    assert asyncio.run(fleet.wait(gen, timeout=1))[os.getpid()]["bundle_id"] == "b2"
    fleet.leave()
    assert fleet.workers() == {}


def test_the_batcher_runs_up_to_k_passes_at_once():
    """With ``concurrency=2`` a request that arrives while a pass runs gets a pass of its own at once: the
    two passes meet at a barrier, which one pass at a time would never reach (BrokenBarrierError)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from cocorec.serve.app import Batcher

    barrier = threading.Barrier(2, timeout=10)

    class Scorer:
        def score_requests(self, reqs: list) -> list:
            barrier.wait()
            return [len(r.items) for r in reqs]

    pool = ThreadPoolExecutor(2)

    async def go() -> list:
        async def in_thread(fn, *a):
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *a)

        b = Batcher(in_thread, concurrency=2)
        s = Scorer()
        first = asyncio.ensure_future(b.submit(s, SimpleNamespace(items=[1])))
        await asyncio.sleep(0.05)   # its pass runs now, waiting at the barrier
        second = asyncio.ensure_future(b.submit(s, SimpleNamespace(items=[1, 2])))
        out = await asyncio.gather(first, second)
        assert b.passes == 2 and b.running == 0
        return out

    assert asyncio.run(go()) == [1, 2]
    pool.shutdown()


def test_two_model_threads_answer_as_one(bundle_dir):
    import asyncio

    from cocorec.serve.app import create_app

    b = BundleScorer(bundle_dir)
    rng = np.random.default_rng(1)
    bodies = [{"user": b.user_ids[int(rng.integers(len(b.user_ids)))],
               "items": [b.item_ids[int(i)] for i in rng.choice(len(b.item_ids), 6, replace=False)]} for _ in range(30)]
    app = create_app(b, model_threads=2)

    async def go() -> list[dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            async def staggered(j: int, body: dict) -> dict:
                await asyncio.sleep(0.002 * j)   # arrivals spread over the passes
                return (await c.post("/score", json=body)).json()
            return await asyncio.gather(*(staggered(j, body) for j, body in enumerate(bodies)))

    for got, body in zip(asyncio.run(go()), bodies):
        np.testing.assert_allclose(got["scores"], b.score(body["user"], body["items"]).scores, rtol=0, atol=1e-6)


def test_a_worker_that_dies_is_replaced_and_serves_the_published_bundle(bundle_dir, tmp_path):
    import signal
    import time

    path = tmp_path / "bundle"
    shutil.copytree(bundle_dir, path)
    with live_server(path, "--workers", "2") as (url, _):
        conns = _one_client_per_worker(url)
        _variant(path, "late")
        r = httpx.post(f"{url}/reload", timeout=120)
        assert r.status_code == 200 and r.json()["workers"] == 2
        victim = next(iter(conns))
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 120
        while True:   # the service answers; a new worker comes up beside the survivor
            try:
                h = httpx.get(f"{url}/healthz", timeout=60).json()
            except httpx.TransportError:   # a connection the dead worker's socket held: reset, as by any crash
                assert time.time() < deadline, "the service stopped answering"
                time.sleep(0.1)
                continue
            assert h["bundle_id"] == r.json()["bundle_id"] and h["users"] == len(BundleScorer(path).user_ids)
            if h["pid"] not in conns:
                break
            assert time.time() < deadline, "no new worker"
            time.sleep(0.2)
        for c in conns.values():
            c.close()


def test_connections_opened_at_once_are_spread_evenly_over_the_workers(bundle_dir):
    """8 kept-alive connections opened at the same moment: 4 on each worker (least connections first),
    every time; the kernel's split by address hash gave 6 / 2 or worse in about a third of the tries."""
    import time
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    with live_server(bundle_dir, "--workers", "2") as (url, _):
        time.sleep(0.5)   # the start-up poll's connection closed and counted off
        for _ in range(3):
            clients = [httpx.Client(base_url=url, timeout=60) for _ in range(8)]
            barrier = threading.Barrier(8)

            def pid(c: httpx.Client) -> int:
                barrier.wait()
                return c.get("/healthz").json()["pid"]

            with ThreadPoolExecutor(8) as pool:
                split = Counter(pool.map(pid, clients))
            assert sorted(split.values()) == [4, 4], split
            for c in clients:
                c.close()
            time.sleep(0.3)


def test_a_port_taken_by_another_program_is_a_one_line_error(bundle_dir, capsys):
    import socket

    from cocorec.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--bundle", str(bundle_dir), "--port", str(port), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and f"cannot bind 127.0.0.1:{port}" in err[-1]
