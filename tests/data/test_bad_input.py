"""Bad input: a clear one-line error naming file/row/column, or a documented, counted handling."""

from __future__ import annotations

import pandas as pd
import pytest

from cocorec.cli import main
from cocorec.data import DataError, prepare
from tests.conftest import write_generic
from tests.data.helpers import edit_spec


def _edit(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    df.to_csv(path, index=False)


def test_missing_file(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    (d / "items.csv").unlink()
    with pytest.raises(DataError, match=r"items\.csv: file not found"):
        prepare(str(d))


def test_missing_column(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    _edit(d / "interactions.csv", lambda df: df.rename(columns={"stars": "score"}))
    with pytest.raises(DataError, match=r"interactions\.csv, column 'stars': missing rating column"):
        prepare(str(d))


def test_non_numeric_rating(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    def f(df):
        df.loc[4, "stars"] = "five"
        return df
    _edit(d / "interactions.csv", f)
    # header is line 1, so data row index 4 is line 6
    with pytest.raises(DataError, match=r"interactions\.csv, row 6, column 'stars': rating 'five' is not a number"):
        prepare(str(d))


def test_unparseable_timestamp(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    def f(df):
        df.loc[2, "ts"] = "yesterday-ish"
        return df
    _edit(d / "interactions.csv", f)
    with pytest.raises(DataError, match=r"row 4, column 'ts': unparseable timestamp 'yesterday-ish'"):
        prepare(str(d))


def test_iso_timestamps_are_accepted(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    _edit(d / "interactions.csv", lambda df: df.assign(ts=pd.to_datetime(df["ts"].astype(int), unit="s")
                                                      .dt.strftime("%Y-%m-%dT%H:%M:%S")))
    assert prepare(str(d)).n_users == 30


def test_empty_table(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    (d / "interactions.csv").write_text("uid,iid,stars,ts\n")
    with pytest.raises(DataError, match=r"interactions\.csv: the table is empty"):
        prepare(str(d))


def test_users_with_too_few_interactions_are_dropped_and_counted(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    _edit(d / "interactions.csv", lambda df: df[~((df["uid"] == "u3") & (df.index % 12 > 2))])
    data = prepare(str(d))
    assert data.n_users == 29
    assert any("dropped 1 users with fewer than 5 interactions (3 interactions)" in n for n in data.notes)


def test_duplicate_rows_are_dropped_and_counted(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    _edit(d / "interactions.csv", lambda df: pd.concat([df, df.iloc[:12]]))
    data = prepare(str(d))
    assert any("dropped 12 exact duplicate interaction rows" in n for n in data.notes)


def test_unknown_items_are_dropped_and_counted(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    def f(df):
        df.loc[0, "iid"] = "nope"
        return df
    _edit(d / "interactions.csv", f)
    data = prepare(str(d))
    assert any("dropped 1 interactions with items missing from the items table (first: item 'nope' at row 2)" in n
               for n in data.notes)


def test_latin1_text_is_decoded_when_declared(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    text = (d / "items.csv").read_text().replace("Item number 1,", "Les Misérables,")
    (d / "items.csv").write_bytes(text.encode("latin-1"))
    # Undeclared, the file is read as UTF-8: the first undecodable byte is an error naming its line.
    with pytest.raises(DataError, match=r"items\.csv, row 3: byte 0xe9 is not valid utf-8 .*encoding: latin-1"):
        prepare(str(d))
    edit_spec(d, lambda s: s["items"].update(encoding="latin-1"))
    data = prepare(str(d))
    assert any("Les Misérables" in t for t in data.item_text)


def test_unknown_spec_key(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    (d / "dataset.yaml").write_text((d / "dataset.yaml").read_text() + "colour: blue\n")
    with pytest.raises(DataError, match=r"dataset\.yaml: unknown key 'colour' \(nearest valid key: '\w+'\)$"):
        prepare(str(d))


def test_missing_movielens_dir(tmp_path):
    with pytest.raises(DataError, match="dataset 'ml-100k' not found"):
        prepare("ml-100k", data_dir=str(tmp_path))


def test_cli_prints_one_line_and_exits_2(tmp_path, cache_dir, capsys):
    d = write_generic(tmp_path / "d")
    (d / "users.csv").unlink()
    assert main(["data", "stats", "--dataset", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "users.csv: file not found" in err[0]


def test_cli_rejects_bad_override(capsys, cache_dir):
    assert main(["train", "--set", "train.lr=fast", "--results", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "lr" in err[0] and "'fast'" in err[0]
