"""Near-line knowledge: the service queues unknown (and changed) users, ``cocorec knowledge refresh``
computes their knowledge with the run's LM through the method's own code and swaps the bundle in; a
refreshed user is known and scored as the method scores it in process. Under load on a real uvicorn
process no request fails and none sees a half-written bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cocorec.data import DataError
from cocorec.serve import load_scorer
from cocorec.serve.app import create_app
from cocorec.serve.bundle import BundleScorer, export_bundle
from cocorec.serve.queue import UserQueue, consume, default_queue_path, snapshot
from cocorec.serve.refresh import extend_data, prepare_users, refresh_bundle, refresh_support
from cocorec.serve.scorer import run_data
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig
from tests.conftest import write_generic
from tests.serve.test_score_every_method import TINY_COCO, TINY_LM

pytestmark = pytest.mark.filterwarnings("ignore:.*user texts exceed")
ARGS = {"kar": TINY_LM, "r4ec": TINY_LM, "coco": TINY_COCO}


@pytest.fixture(scope="module")
def runs(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("refresh")
    toy = write_generic(base / "toy", n_users=30, n_items=20, per_user=12, seed=11)
    out = {}
    for method, args in ARGS.items():
        run(RunConfig(dataset=str(toy), backbone="din", method=method, seed=0, output=str(base / method),
                      results=None, quiet=True, train=TrainConfig(epochs=1, batch_size=64, threads=1),
                      method_args=args, model={"hidden_units": (16,)}))
        export_bundle(base / method, base / f"{method}-bundle")
        out[method] = base / method
    return out


def _copy(runs: dict[str, Path], method: str, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(runs[method].parent / f"{method}-bundle", dst)
    return dst


def _in_process(run_dir: Path, bundle_before: BundleScorer, requested: dict, user: str, items: list[str]):
    """Scores of ``user`` by the method itself (its forward, no table) on the run's data extended by it."""
    data = run_data(run_dir)
    ext, index = extend_data(data, bundle_before, requested)
    scorer = load_scorer(run_dir, data=ext)
    prepare_users(scorer.method, ext, [index[u] for u in requested], data.n_users)
    return scorer.score_user(user, items)


@pytest.mark.parametrize("method", sorted(ARGS))
def test_a_refreshed_user_is_known_and_scored_as_the_method_scores_it(runs, tmp_path, method):
    path = _copy(runs, method, tmp_path)
    before = BundleScorer(path)
    items = before.item_ids[:8]
    prof = {"gender": "F", "age": "30"}
    hist = [before.item_ids[3], {"item": before.item_ids[5], "rating": 2}, before.item_ids[9], "not-an-item"]
    with TestClient(create_app(before)) as c:
        r = c.post("/score", json={"user": "newbie", "items": items, "profile": prof, "history": hist}).json()
        assert r["user_known"] is False
        assert c.post("/score", json={"user": "newbie", "items": items}).json()["user_known"] is False
        known = c.post("/score", json={"user": before.user_ids[4], "items": items}).json()
    entries, _ = snapshot(default_queue_path(path))
    assert list(entries) == ["newbie"]   # once, with the first request's profile and history
    assert entries["newbie"]["history"] == [[before.item_ids[3], 5], [before.item_ids[5], 2], [before.item_ids[9], 5],
                                            ["not-an-item", 5]]
    out = refresh_bundle(path, log=None)
    assert out["users_new"] == 1 and out["users_changed"] == 0 and out["queue_left"] == 0
    assert snapshot(default_queue_path(path))[0] == {}
    after = BundleScorer(path)
    assert after.id == out["bundle_id"] != before.id and after.user_ids == before.user_ids + ["newbie"]
    got = after.score("newbie", items)
    assert got.user_known is True
    want = _in_process(runs[method], before, {"newbie": entries["newbie"]}, "newbie", items)
    np.testing.assert_allclose(got.scores, want, rtol=0, atol=1e-5)
    # the knowledge is the method's, not the fallback's zero
    for key, table in after.knowledge:
        if key == "user":
            assert float(table[-1].abs().max()) > 0
    np.testing.assert_allclose(after.score(before.user_ids[4], items).scores, known["scores"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("method,args", [("base", {}), ("field", {"source": "template"})])
def test_methods_without_an_lm_refresh_too(tmp_path, method, args):
    """``base``: a refreshed user has no knowledge to gain, so it scores as its fallback did, from its own
    stored row now; ``field`` (template source): its vector is the method's, recomputed on the extended data."""
    toy = write_generic(tmp_path / "toy", n_users=30, n_items=20, per_user=12, seed=4)
    run(RunConfig(dataset=str(toy), backbone="din", method=method, seed=0, output=str(tmp_path / "run"),
                  results=None, quiet=True, train=TrainConfig(epochs=1, batch_size=64, threads=1), method_args=args,
                  model={"hidden_units": (16,)}))
    export_bundle(tmp_path / "run", tmp_path / "bundle")
    before = BundleScorer(tmp_path / "bundle")
    items, hist, prof = before.item_ids[:9], [(before.item_ids[4], 5), (before.item_ids[8], 1)], {"gender": "M"}
    fallback = before.score("late", items, history=hist, profile=prof).scores
    UserQueue(default_queue_path(tmp_path / "bundle")).add("late", prof, hist)
    assert refresh_bundle(tmp_path / "bundle", log=None)["users_new"] == 1
    after = BundleScorer(tmp_path / "bundle")
    got = after.score("late", items)
    assert got.user_known is True
    entry = {"late": {"profile": prof, "history": [list(h) for h in hist]}}
    np.testing.assert_allclose(got.scores, _in_process(tmp_path / "run", before, entry, "late", items), rtol=0,
                               atol=1e-5)
    if method == "base":
        np.testing.assert_allclose(got.scores, fallback, rtol=0, atol=1e-6)
    else:
        assert not np.allclose(got.scores, fallback, rtol=0, atol=1e-6)


def test_a_second_refresh_keeps_the_users_of_the_first_and_a_changed_user_is_recomputed(runs, tmp_path):
    path = _copy(runs, "kar", tmp_path)
    b0 = BundleScorer(path)
    items = b0.item_ids[:6]
    with TestClient(create_app(b0)) as c:
        c.post("/score", json={"user": "a", "items": items, "history": b0.item_ids[:4]})
    refresh_bundle(path, log=None)
    b1 = BundleScorer(path)
    a_scores = b1.score("a", items).scores
    old_user = b1.user_ids[2]
    new_hist = [b0.item_ids[10], b0.item_ids[11], b0.item_ids[12]]
    with TestClient(create_app(b1)) as c:
        assert c.post("/score", json={"user": "b", "items": items, "profile": {"gender": "M"}}).status_code == 200
        r = c.post("/score", json={"user": old_user, "items": items, "history": new_hist}).json()
        assert r["user_known"] is True   # scored from the bundle meanwhile, and queued as changed
        c.post("/score", json={"user": b1.user_ids[3], "items": items})   # nothing new: not queued
    entries, _ = snapshot(default_queue_path(path))
    assert {u: e["kind"] for u, e in entries.items()} == {"b": "new", old_user: "changed"}
    out = refresh_bundle(path, log=None)
    assert (out["users_new"], out["users_changed"]) == (1, 1)
    b2 = BundleScorer(path)
    assert b2.user_ids == b0.user_ids + ["a", "b"]
    np.testing.assert_allclose(b2.score("a", items).scores, a_scores, rtol=0, atol=1e-7)
    requested = json.loads((path / "requested_users.json").read_text())["users"]
    assert set(requested) == {"a", "b", old_user}
    u = b2.user_index[old_user]
    assert b2.hist_items[u][-3:].tolist() == [b2.item_index[i] for i in new_hist]
    # the changed user's row (its new sequence) scored by the method itself on the extended data
    data = run_data(runs["kar"])
    ext, index = extend_data(data, b1, requested)
    scorer = load_scorer(runs["kar"], data=ext)
    prepare_users(scorer.method, ext, [index[x] for x in ("b", old_user)], data.n_users)
    batch = b2.user_batch(b2.user_row(old_user), b2.request(old_user, items).items)
    np.testing.assert_allclose(b2.score(old_user, items).scores, scorer.score_batch(batch), rtol=0, atol=1e-5)
    assert not np.allclose(b2.knowledge[0][1][u], b1.knowledge[0][1][u])   # its knowledge was recomputed


def test_what_cannot_be_refreshed_is_refused_in_one_line(runs, tmp_path, capsys):
    assert refresh_support({"method": "coco", "method_args": {}}) is None
    assert refresh_support({"method": "kar", "method_args": {"standardize": True, "fields": "item"}}) is None
    assert "source=oracle" in refresh_support({"method": "coco", "method_args": {"source": "oracle"}})
    assert "source=oracle" in refresh_support({"method": "field", "method_args": {}})
    assert "corrupt=0.3" in refresh_support({"method": "kar", "method_args": {"corrupt": 0.3}})
    assert "standardize" in refresh_support({"method": "r4ec", "method_args": {"standardize": True}})
    assert "not built in" in refresh_support({"method": "mine", "method_args": {}})
    from cocorec.cli import main

    path = _copy(runs, "coco", tmp_path)
    cfg = json.loads((path / "bundle.json").read_text())
    cfg["method_args"]["source"] = "shuffled"
    (path / "bundle.json").write_text(json.dumps(cfg))
    UserQueue(default_queue_path(path)).add("x", None, None)
    assert main(["knowledge", "refresh", "--bundle", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot compute the knowledge of new users" in err and "stay on the fallback" in err
    assert len(err.strip().splitlines()) == 1
    assert list(snapshot(default_queue_path(path))[0]) == ["x"]   # still queued
    with pytest.raises(DataError, match="no checkpoint"):
        cfg["method_args"]["source"] = "lm"
        cfg["run"] = str(tmp_path / "gone")
        (path / "bundle.json").write_text(json.dumps(cfg))
        refresh_bundle(path, log=None)


def test_the_queue_is_deduplicated_bounded_survives_a_restart_and_keeps_what_came_after_a_snapshot(tmp_path):
    q = UserQueue(tmp_path / "q.jsonl", max_users=2)
    assert q.add("u1", {"gender": "F"}, [("i1", 4)]) and not q.add("u1", None, None)
    assert q.add("u2", None, None) and not q.add("u3", None, None) and q.dropped == 1
    again = UserQueue(tmp_path / "q.jsonl", max_users=3)   # a restarted service
    assert again.ids == {"u1", "u2"} and not again.add("u1", None, None)
    entries, offset = snapshot(q.path)
    assert list(entries) == ["u1", "u2"] and entries["u1"]["profile"] == {"gender": "F"}
    assert again.add("u3", None, None)          # appended while a refresh works
    assert consume(q.path, offset) == 1
    assert list(snapshot(q.path)[0]) == ["u3"]
    again.resync()
    assert again.ids == {"u3"}


def test_refresh_under_load_on_a_real_server_loses_no_request(runs, tmp_path):
    """A real uvicorn process on 127.0.0.1: clients keep scoring known users and a new one while
    ``cocorec knowledge refresh --reload URL`` computes the new user's knowledge and swaps the bundle in.
    Every request is answered; a known user's scores never move; the new user is answered either with the
    fallback (before the swap) or with its refreshed knowledge (after it), nothing in between."""
    import threading
    import time

    import httpx

    from cocorec.cli import main
    from tests.serve.live import live_server

    path = _copy(runs, "coco", tmp_path)
    b = BundleScorer(path)
    items = b.item_ids[:10]
    new = {"user": "walk-in", "items": items, "profile": {"gender": "M", "age": "40"}, "history": b.item_ids[2:7]}
    fallback = b.score("walk-in", items, history=[(i, 5) for i in b.item_ids[2:7]], profile=new["profile"]).scores
    bodies = [x for j in range(0, 30, 3) for x in ({"user": b.user_ids[j], "items": items}, new)]
    want = {j: b.score(body["user"], items).scores for j, body in enumerate(bodies) if body is not new}
    answers: list[tuple[int, int, dict]] = []
    with live_server(path) as (url, first):
        assert httpx.post(f"{url}/score", json=new).json()["user_known"] is False   # queued now
        stop = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                j = k
                while not stop.is_set() or j < 30:
                    r = c.post("/score", json=bodies[j % len(bodies)])
                    answers.append((j % len(bodies), r.status_code, r.json()))
                    j += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert main(["knowledge", "refresh", "--bundle", str(path), "--reload", url]) == 0
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
        health = httpx.get(f"{url}/healthz").json()
        after = httpx.post(f"{url}/score", json=new).json()
    assert health["bundle_id"] != first["bundle_id"] and health["users"] == first["users"] + 1
    assert after["user_known"] is True
    refreshed = BundleScorer(path).score("walk-in", items).scores
    np.testing.assert_allclose(after["scores"], refreshed, rtol=0, atol=1e-6)
    assert not np.allclose(refreshed, fallback, rtol=0, atol=1e-6)
    assert len(answers) >= 90 and all(code == 200 for _, code, _ in answers)
    seen = {False: 0, True: 0}
    for j, _, body in answers:
        if j in want:
            np.testing.assert_allclose(np.array(body["scores"], float), want[j], rtol=0, atol=1e-6)
        else:
            ref = refreshed if body["user_known"] else fallback
            np.testing.assert_allclose(np.array(body["scores"], float), ref, rtol=0, atol=1e-6)
            seen[body["user_known"]] += 1
    assert seen[False] >= 1 and seen[True] >= 1
