"""Knowledge generation on Ray Data (``--engine ray``): the single-process texts and vectors, the same cache.

One local Ray session (2 CPUs) for the module; each job starts 2 actors with the tiny LM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cocorec.cli import main
from cocorec.knowledge import kar
from cocorec.knowledge.kar import KarMethod, KnowledgeStore, R4ecMethod
from tests.conftest import write_generic

from cocorec.knowledge.ray_engine import RayKnowledgeStore, planned_identity

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: the ray engine needs the extra "
                                                   "cocorec[scale] (ray[data]==2.60.0)")

SETTINGS = dict(max_new_tokens=8, batch_size=2, item_batch_size=3)


@pytest.fixture(scope="module")
def ray_session(cache_dir):
    """A local Ray for the module (started after the test cache root is set, so workers inherit it)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from cocorec.data import prepare

    d = write_generic(tmp_path_factory.mktemp("ray-toy") / "toy", n_users=8, n_items=10, per_user=8, seed=3)
    return d, prepare(str(d))


def _shards(root: Path, kind_dir: str = "text") -> int:
    return sum(1 for _ in (root / kind_dir).glob("*/shard-*.json"))


@needs_ray
def test_ray_texts_and_vectors_equal_the_single_process_path(ray_session, tiny_data, tmp_path):
    _, data = tiny_data
    users, items = list(range(6)), list(range(1, 7))
    local = KnowledgeStore("tiny", "tiny", root=tmp_path / "local", **SETTINGS)
    u_ref, i_ref = local.user_vectors(data, users), local.item_vectors(data, items)

    store = RayKnowledgeStore("tiny", "tiny", actors=2, threads=1, root=tmp_path / "ray", **SETTINGS)
    assert store.lm.identity == local.lm.identity == planned_identity("tiny")
    store.prefill(data, users, items)   # one job: 3 user batches + 2 item batches on 2 actors
    assert store.stats == {"user": {"generated": 6, "cached": 0}, "item": {"generated": 6, "cached": 0}}
    assert _shards(tmp_path / "ray") == 3 + 2   # every batch flushed to its own shard as it arrived
    system = kar.system_message(data)
    for kind, prompts in (("user", [kar.user_prompt(data, u) for u in users]),
                          ("item", [kar.item_prompt(data, i) for i in items])):
        got = [store.cached(kind, p, system) for p in prompts]
        assert got == [local.cached(kind, p, system) for p in prompts]   # greedy texts identical
        assert all(t is not None for t in got) and len(set(got)) > 1
    np.testing.assert_allclose(store.user_vectors(data, users), u_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.item_vectors(data, items), i_ref, rtol=1e-5, atol=1e-6)
    assert store.stats["user"]["generated"] == 6   # the vectors came from the texts already generated


@needs_ray
def test_a_killed_ray_job_keeps_its_finished_batches_and_the_rerun_sends_only_the_rest(ray_session, tiny_data,
                                                                                       tmp_path, monkeypatch):
    from cocorec.knowledge.cache import TextCache

    _, data = tiny_data
    prompts = [kar.item_prompt(data, i) for i in range(1, 8)]
    system = kar.system_message(data)
    local = KnowledgeStore("tiny", "tiny", root=tmp_path, **SETTINGS)
    first = local.generate("item", prompts[:1], system=system)   # a single-process run stopped after 1 text
    put_many, writes = TextCache.put_many, []

    def dies_after_one_batch(self, items):
        if writes:
            raise KeyboardInterrupt("simulated kill of the driver")
        writes.append(len(items))
        put_many(self, items)

    monkeypatch.setattr(TextCache, "put_many", dies_after_one_batch)
    killed = RayKnowledgeStore("tiny", "tiny", actors=2, root=tmp_path, **SETTINGS)
    with pytest.raises(KeyboardInterrupt):
        killed.generate("item", prompts, system=system)   # 6 missing: 2 batches of 3, killed after the first
    monkeypatch.undo()
    assert writes == [3]
    store = RayKnowledgeStore("tiny", "tiny", actors=2, root=tmp_path, **SETTINGS)
    texts = store.generate("item", prompts, system=system)
    assert store.stats["item"] == {"generated": 3, "cached": 4} and texts[:1] == first
    again = KnowledgeStore("tiny", "tiny", root=tmp_path, **SETTINGS)   # the single-process reader
    assert again.generate("item", prompts, system=system) == texts
    assert again.stats["item"] == {"generated": 0, "cached": 7}
    fresh = KnowledgeStore("tiny", "tiny", root=tmp_path / "fresh", **SETTINGS)
    assert fresh.generate("item", prompts, system=system) == texts   # = an uninterrupted single-process run


@needs_ray
def test_cli_engine_ray_then_training_reads_the_cache_unchanged(ray_session, tiny_data, tmp_path, monkeypatch,
                                                                   capsys):
    d, data = tiny_data
    monkeypatch.setenv("COCOREC_CACHE", str(tmp_path / "cache"))
    args = ["knowledge", "generate", "--dataset", str(d), "--lm", "tiny", "--encoder", "tiny", "--max-new-tokens",
            "8", "--batch-size", "3", "--item-batch-size", "4", "--quiet"]
    # r4ec: user + item texts in one job, then a job per reflect / refine step
    assert main([*args, "--method", "r4ec", "--engine", "ray", "--actors", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"user {data.n_users} new / 0 cached" in out and "cpu x 1 Ray actors" in out
    assert f"reflect {data.n_users} new" in out and f"refine {data.n_users} new" in out
    kw = dict(lm="tiny", encoder="tiny", max_new_tokens=8, batch_size=3, item_batch_size=4)
    r4ec = R4ecMethod(**kw, rounds=1)
    r4ec.prepare(data)   # what `cocorec train --method r4ec` runs: nothing left to generate or encode
    texts = r4ec._info["texts"]
    assert texts["user"] == {"generated": 0, "cached": data.n_users}
    assert texts["item"] == {"generated": 0, "cached": data.spec.n_items - 1}
    assert texts["refine"]["generated"] == texts["reflect"]["generated"] == texts["encode"]["generated"] == 0
    kar = KarMethod(**kw)
    kar.prepare(data)    # kar reads the same reasoning texts (it encodes them: the r4ec run encoded the refined ones)
    assert kar._info["texts"]["user"] == {"generated": 0, "cached": data.n_users}

def test_engine_ray_without_the_extra_is_a_one_line_error(tiny_data, monkeypatch, capsys):
    d, _ = tiny_data
    monkeypatch.setitem(__import__("sys").modules, "ray", None)   # as if ray were not installed
    assert main(["knowledge", "generate", "--dataset", str(d), "--lm", "tiny", "--encoder", "tiny", "--engine", "ray",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cocorec[scale]" in err[0]
