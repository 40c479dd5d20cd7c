"""A generic dataset without a timestamp column (e.g. Frappe): the file's row order is the time order,
and the data says so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cocorec.cli import main
from cocorec.data import DataError, prepare
from tests.conftest import write_generic
from tests.data.helpers import edit_spec, write_implicit


def _drop_time(d, name="interactions.csv", sep=","):
    df = pd.read_csv(d / name, sep=sep, dtype=str)
    df.drop(columns="ts").to_csv(d / name, sep=sep, index=False)
    edit_spec(d, lambda s: s["interactions"].pop("timestamp"))
    return df


def test_without_a_timestamp_file_order_is_time_order(tmp_path, cache_dir, capsys):
    d = write_generic(tmp_path / "d", n_users=20, per_user=10)
    df = _drop_time(d)
    data = prepare(str(d))
    note = "interactions.csv: no timestamp column; the file's row order is the time order"
    assert any(n.startswith(note) for n in data.notes)
    index = {it: i + 1 for i, it in enumerate(data.item_ids)}
    for u in range(data.n_users):      # the LM history: each user's first rows, in file order
        rows = df[df["uid"] == data.user_ids[u]]
        assert [i for i, _ in data.llm_history(u)] == rows["iid"].map(index).head(len(data.llm_history(u))).tolist()
    for s in ("train", "val", "test"):     # a sample's time is its row; its behaviour sequence the rows before it
        sp = data.split(s)
        assert (np.diff(sp.timestamp[sp.user == sp.user[0]]) > 0).all()
    assert main(["data", "stats", "--dataset", str(d)]) == 0
    assert note in capsys.readouterr().out


def test_without_a_timestamp_implicit_log_trains_like_the_timed_one(tmp_path, cache_dir):
    timed = prepare(str(write_implicit(tmp_path / "t")))
    d = write_implicit(tmp_path / "u")
    _drop_time(d, "usage.txt", "\t")
    untimed = prepare(str(d))
    # write_implicit's rows are in time order per user: the same LM histories, samples and negatives
    for k in ("llm_items", "llm_counts", "train/item", "train/label", "test/hist_items"):
        np.testing.assert_array_equal(timed.arrays[k], untimed.arrays[k])


def test_a_named_timestamp_column_must_exist(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    edit_spec(d, lambda s: s["interactions"].update(timestamp="when"))
    with pytest.raises(DataError, match="column 'when': missing timestamp column"):
        prepare(str(d))
