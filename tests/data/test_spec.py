"""The generic spec is strict, tables may be any separator/encoding, and nothing is accepted silently:
unknown keys at every level, ratings off the declared scale, split ratios that do not sum to 1, a
spec threshold that would override the protocol's, a split with one class."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cocorec.cli import main
from cocorec.data import DataError, ProtocolConfig, prepare
from tests.conftest import write_generic
from tests.data.helpers import edit_spec


def _edit_csv(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df).to_csv(path, index=False)


def _set(df, row, col, value):
    df.loc[row, col] = value
    return df


# ------------------------------------------------------------------------- unknown keys at every level
@pytest.mark.parametrize("section,typo,nearest", [
    ("items", "tag", "items.tags"),
    ("interactions", "timestmp", "interactions.timestamp"),
    ("users", "profil", "users.profile"),
    ("domain", "item_nuon", "domain.item_noun"),
    ("negatives", "ration", "negatives.ratio"),
    (None, "feedbak", "feedback"),
])
def test_unknown_nested_key_names_path_and_nearest(tmp_path, cache_dir, section, typo, nearest):
    d = write_generic(tmp_path / "d")

    def f(s):
        if section is None:
            s[typo] = "x"
        else:
            s.setdefault(section, {})[typo] = "genres"
    edit_spec(d, f)
    where = f"{section}.{typo}" if section else typo
    with pytest.raises(DataError, match=rf"dataset\.yaml: unknown key '{where}' \(nearest valid key: '{nearest}'\)$"):
        prepare(str(d))


def test_spec_errors_come_before_any_table_is_read(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    (d / "interactions.csv").unlink()   # would be "file not found" if any table were read first
    edit_spec(d, lambda s: s["items"].update(tag="genres"))
    with pytest.raises(DataError, match=r"unknown key 'items.tag'"):
        prepare(str(d))


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["items"].update(text="blurb"), r"'items\.text' must be a list of non-empty strings, got 'blurb'"),
    (lambda s: s.update(feedback="clicks"), r"'feedback' must be one of explicit, implicit, got 'clicks'"),
    (lambda s: s.update(feedback="implicit", negatives={"strategy": "random"}),
     r"'negatives\.strategy' must be one of uniform, popularity, got 'random'"),
    (lambda s: s.update(feedback="implicit", negatives={"ratio": 0}),
     r"'negatives\.ratio' must be a whole number >= 1"),
    (lambda s: s.update(items=["iid"]), r"'items' must be a mapping of keys to values"),
    (lambda s: s["interactions"].update(rating_scale=[5, 1]),
     r"'interactions\.rating_scale' must be \[lowest, highest\]"),
    (lambda s: s.update(negatives={"ratio": 2}), r"'negatives' applies to feedback: implicit"),
    (lambda s: s["interactions"].update(count="stars"), r"'interactions\.count' applies to feedback: implicit"),
    (lambda s: s.update(feedback="implicit"), r"feedback: implicit takes no 'interactions\.rating'"),
    (lambda s: s.update(positive_threshold=9), r"positive_threshold 9 is not inside the rating scale \(1, 5\]"),
    (lambda s: s["interactions"].update(encoding="utf9"), r"'interactions\.encoding': unknown encoding 'utf9'"),
])
def test_spec_values_are_checked(tmp_path, cache_dir, edit, message):
    d = edit_spec(write_generic(tmp_path / "d"), edit)
    with pytest.raises(DataError, match=r"dataset\.yaml: " + message):
        prepare(str(d))


# ------------------------------------------------------------------------- sep and encoding
@pytest.mark.parametrize("name,sep", [("interactions.txt", "\t"), ("interactions.data", "\t"),
                                      ("interactions.csv", ";")])
def test_sep_option_reads_any_file_name(tmp_path, cache_dir, name, sep):
    ref = prepare(str(write_generic(tmp_path / "ref")))
    d = write_generic(tmp_path / "d")
    pd.read_csv(d / "interactions.csv", dtype=str).to_csv(d / "tmp", sep=sep, index=False)
    (d / "interactions.csv").unlink()
    (d / "tmp").rename(d / name)
    edit_spec(d, lambda s: s["interactions"].update(file=name, sep=sep))
    data = prepare(str(d))
    np.testing.assert_array_equal(data.split("test").label, ref.split("test").label)
    np.testing.assert_array_equal(data.split("test").item, ref.split("test").item)


def test_tab_file_without_sep_is_not_silently_one_column(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    pd.read_csv(d / "interactions.csv", dtype=str).to_csv(d / "interactions.csv", sep="\t", index=False)
    with pytest.raises(DataError, match=r"interactions\.csv, column 'uid': missing user column \(have: uid\\tiid"
                                        r"\\tstars\\tts\); the header holds '\\t': give the table's separator as sep"):
        prepare(str(d))


def test_mixed_encoding_names_the_first_bad_row(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    text = (d / "items.csv").read_text().replace("Item number 1,", "Amélie,")   # valid UTF-8 ...
    blob = text.encode("utf-8").replace(b"Item number 7,", "Café,".encode("latin-1"))   # ... one stray latin-1 byte
    (d / "items.csv").write_bytes(blob)
    with pytest.raises(DataError, match=r"items\.csv, row 9: byte 0xe9 is not valid utf-8"):
        prepare(str(d))
    edit_spec(d, lambda s: s["items"].update(encoding="utf-8"))   # declared: the same error
    with pytest.raises(DataError, match=r"items\.csv, row 9: byte 0xe9 is not valid utf-8"):
        prepare(str(d))


def test_sep_on_parquet_is_an_error(tmp_path, cache_dir):
    d = edit_spec(write_generic(tmp_path / "d", fmt="parquet"), lambda s: s["items"].update(sep=","))
    with pytest.raises(DataError, match=r"items\.parquet: sep and encoding apply to text tables, not to Parquet"):
        prepare(str(d))


# ------------------------------------------------------------------------- rating scale
@pytest.mark.parametrize("value", ["-3", "7", "1e9", "inf"])
def test_rating_outside_scale_is_an_error(tmp_path, cache_dir, value):
    d = write_generic(tmp_path / "d")
    _edit_csv(d / "interactions.csv", lambda df: _set(df, 5, "stars", value))
    with pytest.raises(DataError, match=rf"interactions\.csv, row 7, column 'stars': rating '{value}' is outside "
                                        rf"the rating scale \[1, 5\]$"):
        prepare(str(d))


def test_declared_rating_scale(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    _edit_csv(d / "interactions.csv", lambda df: df.assign(stars=(df["stars"].astype(int) * 2).astype(str)))
    with pytest.raises(DataError, match=r"rating '10' is outside the rating scale \[1, 5\]"):
        prepare(str(d))
    edit_spec(d, lambda s: s["interactions"].update(rating_scale=[0, 10]))
    data = prepare(str(d), ProtocolConfig(positive_threshold=8))
    ref = prepare(str(write_generic(tmp_path / "ref")))   # the same data on 1-5: stars*2 >= 8 <=> stars >= 4
    np.testing.assert_array_equal(data.split("train").label, ref.split("train").label)
    hr = data.split("train").hist_ratings
    assert hr[hr > 0].min() >= 1 and hr.max() <= 5 and data.feedback["rating_scale"] == [0.0, 10.0]
    assert data.domain.feedback_meaning == "rating from 0 to 10"


# ------------------------------------------------------------------------- protocol settings
@pytest.mark.parametrize("ratios,message", [
    ("0.8,0.3,0.1", r"protocol\.split_ratios \(0\.8, 0\.3, 0\.1\) sum to 1\.2, over 1$"),
    ("0.5,0.1,0.1", r"protocol\.split_ratios \(0\.5, 0\.1, 0\.1\) sum to 0\.7, under 1"),
    ("0.9,0.1,0", r"the test share is 0"),
    ("0.8,0.2", r"needs 3 shares"),
])
def test_split_ratios_not_summing_to_one(tmp_path, cache_dir, capsys, ratios, message):
    d = write_generic(tmp_path / "d")
    (d / "items.csv").unlink()   # the check comes before any data is read
    rc = main(["train", "--dataset", str(d), "--set", f"protocol.split_ratios={ratios}", "--results", "", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert pd.Series(err).str.contains(message).all(), err


def test_spec_threshold_never_silently_overrides_the_protocol(tmp_path, cache_dir):
    d = edit_spec(write_generic(tmp_path / "d"), lambda s: s.update(positive_threshold=3))
    with pytest.raises(DataError, match=r"dataset\.yaml: the spec declares positive_threshold 3 but "
                                        r"protocol\.positive_threshold is 4; .*--set protocol\.positive_threshold=3"):
        prepare(str(d))
    data = prepare(str(d), ProtocolConfig(positive_threshold=3))
    raw = pd.read_csv(d / "interactions.csv")
    assert data.config.positive_threshold == 3
    labels = np.concatenate([data.split(s).label for s in ("train", "val", "test")])
    # rating >= 3 acts (not the protocol default 4): the label rate matches it, not the >= 4 rate
    assert abs(labels.mean() - (raw["stars"] >= 3).mean()) < abs(labels.mean() - (raw["stars"] >= 4).mean())


def test_recorded_threshold_is_the_acting_one(tmp_path, cache_dir):
    d = edit_spec(write_generic(tmp_path / "d", n_users=20, per_user=8), lambda s: s.update(positive_threshold=3))
    out = tmp_path / "run"
    rc = main(["train", "--dataset", str(d), "--backbone", "deepfm", "--epochs", "1", "--output", str(out),
               "--results", "", "--quiet", "--set", "protocol.positive_threshold=3"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["protocol"]["positive_threshold"] == 3


def test_threshold_outside_the_scale_is_an_error(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    with pytest.raises(DataError, match=r"protocol\.positive_threshold 6 is not inside the rating scale \(1, 5\]"):
        prepare(str(d), ProtocolConfig(positive_threshold=6))


def test_threshold_on_label_only_data_is_an_error(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    _edit_csv(d / "interactions.csv", lambda df: df.assign(clicked=(df["stars"].astype(int) >= 3).astype(int)))
    edit_spec(d, lambda s: (s["interactions"].pop("rating"), s["interactions"].update(label="clicked")))
    assert prepare(str(d)).feedback == {"type": "explicit", "rating_scale": None, "positive_threshold": None}
    with pytest.raises(DataError, match=r"protocol\.positive_threshold 3 does not apply: the dataset gives 0/1 labels"):
        prepare(str(d), ProtocolConfig(positive_threshold=3))


# ------------------------------------------------------------------------- one class
def test_all_positive_ratings_is_an_error_not_nan(tmp_path, cache_dir, capsys):
    d = write_generic(tmp_path / "d")
    _edit_csv(d / "interactions.csv", lambda df: df.assign(stars="5"))
    rc = main(["train", "--dataset", str(d), "--results", str(tmp_path / "r.jsonl"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "the train split has only positive labels" in err[0] and "AUC is undefined" in err[0]
    assert "feedback: implicit" in err[0]
    assert not (tmp_path / "r.jsonl").exists()


def test_all_positive_labels_is_an_error(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    _edit_csv(d / "interactions.csv", lambda df: df.assign(clicked="1"))
    edit_spec(d, lambda s: (s["interactions"].pop("rating"), s["interactions"].update(label="clicked")))
    with pytest.raises(DataError, match=r"the train split has only positive labels \(\d+ samples\), so AUC is "
                                        r"undefined: every interaction is labelled 1; .*'feedback: implicit'"):
        prepare(str(d))


def test_one_class_in_a_small_split_says_why(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d", n_users=12, per_user=6)
    # Everyone rates 1, except the user who lands alone in val: every split but val has only negatives.
    data = prepare(str(d))
    val_user = data.user_ids[int(data.split("val").user[0])]
    _edit_csv(d / "interactions.csv", lambda df: df.assign(stars=np.where(df["uid"] == val_user, "5", "1")))
    with pytest.raises(DataError, match=r"the train split has only negative labels .* the data has both "
                                        r"\(positive rate [0-9.]+\) but this split does not"):
        prepare(str(d))


def test_group_column_must_be_a_profile_column(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")
    (d / "users.csv").unlink()   # checked with the spec, before any table is read
    edit_spec(d, lambda s: s["users"].update(groups=["gender", "income"]))
    with pytest.raises(DataError, match=r"dataset\.yaml: group column 'income' is not a profile column "
                                        r"\(users\.profile: gender, age\)$"):
        prepare(str(d))


@pytest.mark.parametrize("override,message", [
    ("max_hist_len=0", r"protocol\.max_hist_len must be a whole number >= 1, got 0"),
    ("split_seed=-1", r"protocol\.split_seed must be a whole number >= 0, got -1"),
    ("min_user_interactions=0", r"protocol\.min_user_interactions must be a whole number >= 1, got 0"),
    ("positive_threshold=nan", r"protocol\.positive_threshold must be a finite number, got nan"),
])
def test_protocol_settings_that_cannot_act(tmp_path, cache_dir, capsys, override, message):
    d = write_generic(tmp_path / "d")
    rc = main(["train", "--dataset", str(d), "--set", f"protocol.{override}", "--results", "", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and pd.Series(err).str.contains(message).all(), err
