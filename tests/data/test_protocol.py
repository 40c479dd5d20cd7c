"""The CTR protocol on real MovieLens-100K and on the generic format."""

from __future__ import annotations

import numpy as np
import pytest

from cocorec.data import ProtocolConfig, prepare
from cocorec.data.raw import load_raw
from tests.conftest import write_generic


def test_no_user_in_two_splits(ml100k):
    users = [set(ml100k.split(s).user.tolist()) for s in ("train", "val", "test")]
    assert not users[0] & users[1] and not users[0] & users[2] and not users[1] & users[2]
    assert len(users[0] | users[1] | users[2]) == ml100k.n_users == 943


def test_split_is_80_10_10_by_user(ml100k):
    counts = [len(np.unique(ml100k.split(s).user)) for s in ("train", "val", "test")]
    assert counts == [754, 94, 95]


def test_llm_history_never_becomes_a_sample(ml100k):
    raw = load_raw("ml-100k")
    lens = raw.interactions.groupby("user").size()
    for s in ("train", "val", "test"):
        sp = ml100k.split(s)
        for u in np.unique(sp.user)[:50]:
            n = int(lens[ml100k.user_ids[u]])
            n_llm = min(30, n // 2)
            pos = sp.position[sp.user == u]
            assert pos.min() == n_llm and pos.max() == n - 1 and len(pos) == n - n_llm
            assert ml100k.llm_offsets[u + 1] - ml100k.llm_offsets[u] == n_llm


def test_each_users_llm_history_is_their_own_first_interactions(ml100k):
    # User ids sort differently as text ("10" < "2") and as the index does: every user's LM history
    # must still be that user's own earliest interactions, the ones just before their first sample.
    raw = load_raw("ml-100k")
    inter = raw.interactions.assign(row=np.arange(len(raw.interactions)))
    by_user = {u: g.sort_values(["timestamp", "row"], kind="stable") for u, g in inter.groupby("user")}
    item_of = {i: ml100k.meta["item_ids"][i - 1] for i in range(1, ml100k.spec.n_items)}
    for u in range(ml100k.n_users):
        hist = ml100k.llm_history(u)
        first = by_user[ml100k.user_ids[u]].head(len(hist))
        assert [item_of[i] for i, _ in hist] == first["item"].tolist(), u
        assert [r for _, r in hist] == first["rating"].astype(int).tolist(), u
    sp = ml100k.split("train")
    first_rows = np.flatnonzero(sp.position == np.array([len(ml100k.llm_history(u)) for u in sp.user]))
    for r in first_rows[:200]:   # the behaviour sequence of a user's first sample ends with their LM history
        tail = [i for i, _ in ml100k.llm_history(int(sp.user[r]))][-ml100k.spec.max_hist_len:]
        assert sp.hist_items[r][-len(tail):].tolist() == tail


def test_history_strictly_earlier_than_sample(ml100k):
    raw = load_raw("ml-100k")
    df = raw.interactions.sort_values(["user", "timestamp", "row"], kind="stable")
    seqs = {u: g["item"].tolist() for u, g in df.groupby("user")}
    sp = ml100k.split("train")
    rng = np.random.default_rng(0)
    for j in rng.choice(sp.n, size=300, replace=False):
        u = ml100k.user_ids[sp.user[j]]
        seq = seqs[u]
        pos = sp.position[j]
        assert ml100k.item_ids[sp.item[j] - 1] == seq[pos]
        hist = [ml100k.item_ids[i - 1] for i in sp.hist_items[j] if i > 0]
        assert hist == seq[max(0, pos - 10):pos]  # the previous max_hist_len items, oldest first
    # timestamps of history items are <= the sample's and the order is the file's stable order
    assert (sp.hist_items[:, -1] > 0).all()


def test_labels_are_rating_at_least_4(ml100k):
    raw = load_raw("ml-100k")
    pos_rate = float((raw.interactions["rating"] >= 4).mean())
    all_labels = np.concatenate([ml100k.split(s).label for s in ("train", "val", "test")])
    assert set(np.unique(all_labels)) == {0.0, 1.0}
    assert abs(all_labels.mean() - pos_rate) < 0.05


def test_texts_exist_for_users_and_items(ml100k):
    assert len(ml100k.user_text) == ml100k.n_users
    assert "User profile" in ml100k.user_text[0] and "/5)" in ml100k.user_text[0]
    assert ml100k.item_text[0] == "" and ml100k.item_text[1].startswith("Title:")
    assert set(ml100k.user_groups) == {"gender", "age_group", "gender x age_group"}


def test_batch_shapes(ml100k):
    b = ml100k.batch("val", np.arange(7))
    assert b["hist_items"].shape == (7, 10) and b["hist_tags"].shape == (7, 10, ml100k.spec.max_tags)
    assert b["user_feats"].shape == (7, len(ml100k.spec.user_fields))
    assert b["hist_mask"].dtype.name == "bool" if hasattr(b["hist_mask"].dtype, "name") else True


def test_cache_is_keyed_by_settings(ml100k, cache_dir):   # ml100k: skipped where the data is absent
    a = prepare("ml-100k")
    b = prepare("ml-100k", ProtocolConfig(max_hist_len=5))
    assert a.key != b.key and b.split("train").hist_items.shape[1] == 5
    again = prepare("ml-100k")
    assert again.key == a.key
    np.testing.assert_array_equal(again.split("test").label, a.split("test").label)


def test_split_seed_changes_split(ml100k, cache_dir):
    a = prepare("ml-100k", ProtocolConfig(split_seed=1))
    b = prepare("ml-100k", ProtocolConfig(split_seed=2))
    assert set(a.split("test").user.tolist()) != set(b.split("test").user.tolist())


def test_ml1m_3k_users(cache_dir):
    from cocorec.data import DataError
    try:
        raw = load_raw("ml-1m-3k")
    except DataError as e:
        pytest.skip(str(e))
    assert raw.name == "ml-1m-3k"
    assert raw.interactions["user"].astype(int).max() <= 2999
    assert raw.interactions["user"].nunique() == 2999


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_format(tmp_path, cache_dir, fmt):
    d = write_generic(tmp_path / "toy", fmt=fmt)
    data = prepare(str(d))
    assert data.name == "toy" and data.n_users == 30
    st = data.stats()
    assert st["train"]["users"] + st["val"]["users"] + st["test"]["users"] == 30
    assert "blurb" in data.item_text[1] and "Drama" in " ".join(data.item_text)
    assert set(data.user_groups) == {"gender", "age", "gender x age"}


def test_a_truncated_processed_cache_is_named_and_rebuilt(tmp_path, monkeypatch, capsys):
    from tests.conftest import write_generic

    from cocorec.data.protocol import prepare

    monkeypatch.setenv("COCOREC_CACHE", str(tmp_path / "cache"))
    d = write_generic(tmp_path / "toy", n_users=30, n_items=20, per_user=12, seed=1)
    first = prepare(str(d))
    arrays = next((tmp_path / "cache" / "processed").glob("*/arrays.npz"))
    arrays.write_bytes(arrays.read_bytes()[: arrays.stat().st_size // 2])   # e.g. the disk filled up
    again = prepare(str(d))
    assert "is damaged" in capsys.readouterr().err and again.key == first.key
    assert all((again.arrays[k] == first.arrays[k]).all() for k in first.arrays)
    assert prepare(str(d)).key == first.key                                 # rebuilt cache loads cleanly
