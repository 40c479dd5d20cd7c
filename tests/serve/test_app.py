"""``cocorec serve``: every endpoint with good and bad requests (types, limits, body size, API key,
unknown user and items), metrics, and concurrent answers equal to sequential ones."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cocorec.serve.app import create_app
from cocorec.serve.bundle import BundleScorer, export_bundle
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig
from tests.conftest import write_generic
from tests.serve.test_score_every_method import TINY_COCO

pytestmark = pytest.mark.filterwarnings("ignore:.*user texts exceed")
KEY = "s3cret"


@pytest.fixture(scope="module")
def bundle(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BundleScorer:
    base = tmp_path_factory.mktemp("app")
    toy = write_generic(base / "toy", n_users=30, n_items=20, per_user=12, seed=7)
    run(RunConfig(dataset=str(toy), backbone="din", method="coco", seed=0, output=str(base / "run"), results=None,
                  quiet=True, train=TrainConfig(epochs=1, batch_size=64, threads=1), method_args=TINY_COCO,
                  model={"hidden_units": (16,)}))
    export_bundle(base / "run", base / "bundle")
    return BundleScorer(base / "bundle")


@pytest.fixture(scope="module")
def client(bundle):
    with TestClient(create_app(bundle, max_candidates=50, max_history=5, max_body_bytes=4096)) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(bundle):
    with TestClient(create_app(bundle, api_key=KEY)) as c:
        yield c


def test_score_known_user_in_the_order_of_the_items(client, bundle):
    user, items = bundle.user_ids[3], bundle.item_ids[:6]
    r = client.post("/score", json={"user": user, "items": items[::-1]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unknown_items"] == [] and body["user_known"] is True
    np.testing.assert_allclose(body["scores"], bundle.score(user, items[::-1]).scores, rtol=0, atol=1e-7)


def test_unknown_items_are_reported_never_a_500(client, bundle):
    items = [bundle.item_ids[0], "nope", bundle.item_ids[1], "nope-2"]
    r = client.post("/score", json={"user": bundle.user_ids[0], "items": items})
    assert r.status_code == 200
    body = r.json()
    assert body["unknown_items"] == ["nope", "nope-2"]
    assert body["scores"][1] is None and body["scores"][3] is None and 0 < body["scores"][0] < 1
    r = client.post("/score", json={"user": bundle.user_ids[0], "items": ["x", "y"]})
    assert r.status_code == 200 and r.json() == {"scores": [None, None], "unknown_items": ["x", "y"],
                                                 "user_known": True}


def test_unknown_user_gets_the_fallback_from_profile_and_history(client, bundle):
    items = bundle.item_ids[:3]
    body = {"user": "never-seen", "items": items, "profile": {"gender": "F", "age": "30"},
            "history": [bundle.item_ids[5], {"item": bundle.item_ids[6], "rating": 2}, "not-an-item"]}
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["user_known"] is False
    want = bundle.score("never-seen", items, history=[(bundle.item_ids[5], 5), (bundle.item_ids[6], 2)],
                        profile={"gender": "F", "age": "30"})
    np.testing.assert_allclose(out["scores"], want.scores, rtol=0, atol=1e-7)
    r = client.post("/score", json={"items": items})   # no user at all
    assert r.status_code == 200 and r.json()["user_known"] is False


def test_recommend_is_the_top_k_of_the_known_candidates(client, bundle):
    user, items = bundle.user_ids[2], bundle.item_ids[:10] + ["ghost"]
    r = client.post("/recommend", json={"user": user, "items": items, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = bundle.score(user, items).scores
    order = sorted(range(10), key=lambda j: -scores[j])[:3]
    assert body["items"] == [items[j] for j in order] and body["unknown_items"] == ["ghost"]
    assert body["scores"] == sorted(body["scores"], reverse=True)
    assert client.post("/recommend", json={"user": user, "items": items}).json()["items"] == \
        [items[j] for j in sorted(range(10), key=lambda j: -scores[j])]


@pytest.mark.parametrize("body,code,reason", [
    ({"user": 196, "items": ["a"]}, 422, "user: Input should be a valid string"),
    ({"user": "1", "items": "a"}, 422, "items: Input should be a valid array"),
    ({"user": "1", "items": [1, 2]}, 422, "items.0: Input should be a valid string"),
    ({"user": "1", "items": []}, 422, "items: List should have at least 1 item"),
    ({"user": "1", "items": [str(i) for i in range(51)]}, 422, "items: at most 50 entries"),
    ({"user": "1", "items": ["a"], "history": ["a"] * 6}, 422, "history: at most 5 entries"),
    ({"user": "1", "items": ["a"], "history": [{"item": "a", "rating": 9}]}, 422, "less than or equal to 5"),
    ({"user": "1", "items": ["a"], "extra": 1}, 422, "extra: Extra inputs are not permitted"),
    ({"user": "1"}, 422, "items: Field required"),
])
def test_bad_requests_are_a_4xx_with_one_line(client, body, code, reason):
    for path in ("/score", "/recommend"):
        r = client.post(path, json=body)
        assert r.status_code == code, r.text
        detail = r.json()["detail"]
        assert reason in detail and "\n" not in detail


def test_bad_json_oversized_body_and_bad_k(client, bundle):
    r = client.post("/score", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"] == "the body is not valid JSON"
    r = client.post("/score", json={"user": "1", "items": ["x" * 100] * 45})
    assert r.status_code == 413 and "at most 4096" in r.json()["detail"]
    r = client.post("/recommend", json={"user": "1", "items": ["a"], "k": 0})
    assert r.status_code == 422 and r.json()["detail"].startswith("k:")
    assert client.get("/score").status_code == 405
    assert client.get("/nowhere").status_code == 404


def test_api_key(keyed, bundle):
    body = {"user": bundle.user_ids[0], "items": bundle.item_ids[:2]}
    r = keyed.post("/score", json=body)
    assert r.status_code == 401 and r.json()["detail"] == "missing X-API-Key header"
    r = keyed.post("/score", json=body, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and r.json()["detail"] == "wrong API key"
    assert keyed.post("/score", json=body, headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.post("/recommend", json=body).status_code == 401
    assert keyed.get("/metrics").status_code == 401
    assert keyed.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.get("/healthz").status_code == 200   # liveness needs no key


def test_healthz_and_metrics(bundle, tmp_path):
    c = TestClient(create_app(bundle, batching=False, queue=str(tmp_path / "queue.jsonl")))
    h = c.get("/healthz").json()
    assert h["status"] == "ok" and h["method"] == "coco" and h["users"] == len(bundle.user_ids)
    assert h["knowledge"] == [{"key": "user", "name": "user", "dim": 8}]
    assert h["profile_fields"] == {"gender": ["F", "M"], "age": ["20", "30", "40", "50"]}
    c.post("/score", json={"user": bundle.user_ids[0], "items": [bundle.item_ids[0], "zz"]})
    c.post("/score", json={"user": "newbie", "items": [bundle.item_ids[0]]})
    c.post("/score", json={"user": 1, "items": []})
    text = c.get("/metrics").text
    assert 'cocorec_requests_total{code="200",endpoint="/score"} 2.0' in text
    assert 'cocorec_errors_total{code="422",endpoint="/score"} 1.0' in text
    assert 'cocorec_request_latency_seconds_count{endpoint="/score"} 3.0' in text
    assert 'cocorec_knowledge_lookups_total{result="hit"} 1.0' in text
    assert 'cocorec_knowledge_lookups_total{result="fallback"} 1.0' in text
    assert "cocorec_unknown_items_total 1.0" in text and "cocorec_unknown_users 1.0" in text
    assert 'cocorec_queued_users_total{kind="new"} 1.0' in text
    assert c.get("/healthz").json()["queued_users"] == 1


def _bodies(bundle: BundleScorer, n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"user": bundle.user_ids[int(rng.integers(len(bundle.user_ids)))] if j % 5 else f"new-{j}",
             "items": [bundle.item_ids[int(i)] for i in rng.choice(len(bundle.item_ids), 8, replace=False)]
             + (["ghost"] if j % 7 == 0 else [])} for j in range(n)]


def test_concurrent_answers_equal_sequential(client, bundle):
    bodies = _bodies(bundle, 40)
    sequential = [client.post("/score", json=b).json() for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda b: client.post("/score", json=b).json(), bodies))
    for a, b in zip(concurrent, sequential):
        assert a["unknown_items"] == b["unknown_items"] and a["user_known"] == b["user_known"]
        np.testing.assert_allclose(np.array(a["scores"], float), np.array(b["scores"], float), rtol=0, atol=1e-6)


@pytest.mark.parametrize("batching", [True, False])
def test_requests_in_one_event_loop_share_model_passes(bundle, batching):
    import asyncio

    import httpx

    app = create_app(bundle, batching=batching)
    bodies = _bodies(bundle, 40)
    alone = [bundle.score(b["user"], b["items"]).scores for b in bodies]

    async def go() -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            rs = await asyncio.gather(*(c.post("/score", json=b) for b in bodies))
        return [r.json() for r in rs]

    answers = asyncio.run(go())
    for got, want in zip(answers, alone):
        np.testing.assert_allclose(np.array(got["scores"], float), np.array(want, float), rtol=0, atol=1e-6)
    if batching:
        assert 1 <= app.state.batcher.passes < len(bodies)


def test_a_bundle_that_cannot_be_read_leaves_the_old_one_serving(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle.path, copy)
    with TestClient(create_app(BundleScorer(copy))) as c:
        body = {"user": bundle.user_ids[0], "items": bundle.item_ids[:3]}
        before = c.post("/score", json=body).json()
        (copy / "tables.safetensors").write_bytes(b"broken")
        r = c.post("/reload")
        assert r.status_code == 409 and r.json()["detail"].startswith("reload refused, the old bundle stays")
        assert c.post("/score", json=body).json() == before
        assert 'cocorec_bundle_reloads_total{result="failed"} 1.0' in c.get("/metrics").text


def test_reload_under_load_on_a_real_server_loses_no_request(bundle, tmp_path):
    """A real uvicorn process on 127.0.0.1: the bundle is exported again (--overwrite: a rename) and
    reloaded while a client keeps scoring; every request is answered, with the same scores."""
    import shutil
    import threading
    import time

    import httpx

    from cocorec.cli import main
    from tests.serve.live import live_server

    live = tmp_path / "bundle"
    shutil.copytree(bundle.path, live)
    with live_server(live) as (url, first):
        bodies = _bodies(bundle, 10)
        want = [bundle.score(b["user"], b["items"]).scores for b in bodies]
        answers: list[tuple[int, int, object]] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                j = 0
                while not stop.is_set() or j < 20:
                    r = c.post("/score", json=bodies[j % len(bodies)])
                    answers.append((j % len(bodies), r.status_code, r.json()))
                    j += 1

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert main(["export", "--run", str(bundle.path.parent / "run"), "--to", str(live), "--overwrite"]) == 0
        r = httpx.post(f"{url}/reload", timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["previous"] == first["bundle_id"] != r.json()["bundle_id"]
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        assert httpx.get(f"{url}/healthz").json()["bundle_id"] == r.json()["bundle_id"]
    assert len(answers) >= 60 and all(code == 200 for _, code, _ in answers)
    for j, _, body in answers:
        np.testing.assert_allclose(np.array(body["scores"], float), np.array(want[j], float), rtol=0, atol=1e-6)


def test_serve_command_checks_its_settings_and_the_bundle(tmp_path, capsys):
    from cocorec.cli import main

    assert main(["serve", "--bundle", str(tmp_path), "--max-candidates", "0"]) == 2
    assert "--max-candidates must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--bundle", str(tmp_path)]) == 2
    assert "not a bundle" in capsys.readouterr().err
