"""Bad settings and damaged caches end with one ``error:`` line naming the setting or file and a non-zero exit
code, before any data is read (the dataset named here does not exist: reaching it would be another error)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from cocorec.cli import main
from cocorec.config import ConfigError
from cocorec.knowledge.cache import CacheError, TextCache, VectorCache, key_of
from cocorec.train.trainer import TrainConfig

NO_DATA = ["train", "--dataset", "no-such-dataset", "--results", "", "--quiet"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["--backbone", "dinn"], "error: unknown backbone 'dinn' (did you mean 'din'?); one of autoint, dcnv2"),
    (["--method", "karr"], "error: unknown method 'karr' (did you mean 'kar'?); one of base, coco"),
    (["--set", "train.batch_size=0"], "error: train.batch_size must be >= 1, got 0"),
    (["--set", "train.lr=-1"], "error: train.lr must be > 0, got -1.0"),
    (["--set", "train.lr=nan"], "error: train.lr must be a finite number, got nan"),
    (["--set", "train.weight_decay=-0.1"], "error: train.weight_decay must be >= 0, got -0.1"),
    (["--set", "train.eval_batch_size=0"], "error: train.eval_batch_size must be >= 1, got 0"),
    (["--set", "train.patience=0"], "error: train.patience must be >= 1, got 0"),
    (["--epochs", "0"], "error: train.epochs must be >= 1, got 0"),
    (["--epochs", "-2"], "error: train.epochs must be >= 1, got -2"),
    (["--seed", "-1"], "error: seed must be an integer from 0 to 2**32 - 1, got -1"),
    (["--seed", str(2**32)], "error: seed must be an integer from 0 to 2**32 - 1, got 4294967296"),
    (["--device", "gpu"], "error: train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--method", "coco", "--set", "method.codebook_size=0"], "error: codebook_size, prompt_len and key_dim must be"),
    (["--method", "coco", "--set", "method.guard_test=ttest"], "error: guard_test must be one of ('margin', 'boot"),
    (["--method", "coco", "--set", "method.kv_storage=tape"], "error: kv_storage must be one of"),
])
def test_bad_settings_fail_before_the_data(args, message, capsys):
    assert main([*NO_DATA, *args]) == 2
    assert _one_error_line(capsys).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is available here")
def test_cuda_where_there_is_none(capsys):
    assert main([*NO_DATA, "--device", "cuda"]) == 2
    assert "train.device=cuda but no CUDA device is available" in _one_error_line(capsys)


def test_train_config_checks_its_values_wherever_it_is_made():
    with pytest.raises(ConfigError, match=r"train\.batch_size must be >= 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"train\.max_steps_per_epoch must be >= 1, got 0"):
        TrainConfig(max_steps_per_epoch=0)
    assert TrainConfig(max_steps_per_epoch=None, threads=None, grad_clip=0.0).grad_clip == 0.0


@pytest.mark.parametrize("args, message", [
    (["--items", ""], "error: --items '' holds no item id: give comma-separated ids"),
    (["--items", " , ,"], "error: --items ' , ,' holds no item id"),
    ([], "error: give the candidates with one of --items ID,ID,... or --items-file FILE"),
    (["--items", "1", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
])
def test_score_bad_candidates(args, message, tmp_path, capsys):
    assert main(["score", "--run", str(tmp_path / "no-run"), "--user", "1", *args]) == 2
    assert _one_error_line(capsys).startswith(message)


def test_score_items_file_errors(tmp_path, capsys):
    run = ["score", "--run", str(tmp_path / "no-run"), "--user", "1", "--items-file"]
    assert main([*run, str(tmp_path / "missing.txt")]) == 2
    assert _one_error_line(capsys) == f"error: {tmp_path / 'missing.txt'}: file not found"
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main([*run, str(tmp_path / "empty.txt")]) == 2
    assert _one_error_line(capsys) == f"error: {tmp_path / 'empty.txt'}: no item ids in the file"
    (tmp_path / "bin.txt").write_bytes(b"242\n\xff\xfe\n")
    assert main([*run, str(tmp_path / "bin.txt")]) == 2
    assert _one_error_line(capsys).startswith(f"error: {tmp_path / 'bin.txt'}, line 2: not UTF-8 text")
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame({"a": ["1"], "b": ["2"]}).to_parquet(tmp_path / "two.parquet")
    assert main([*run, str(tmp_path / "two.parquet")]) == 2
    assert _one_error_line(capsys).endswith("two.parquet: expected one column of item ids, found 2 (a, b)")


@pytest.mark.parametrize("cls", [TextCache, VectorCache])
def test_truncated_cache_meta_is_named_and_rebuilt(cls, tmp_path):
    ns = key_of("x")
    c = cls(tmp_path, ns, meta={"what": "test"})
    c.put_many({"a": "text"} if cls is TextCache else {"a": [1.0, 2.0]})
    meta = tmp_path / ns / "meta.json"
    meta.write_text(meta.read_text()[:20])
    with pytest.warns(UserWarning, match=rf"{meta}: unreadable .*; rebuilt it .*its 1 shard\(s\) are kept"):
        again = cls(tmp_path, ns)
    assert "a" in again and json.loads(meta.read_text())["key"] == ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(tmp_path, ns)                                   # rebuilt: no warning the next time


def test_damaged_cache_meta_with_foreign_shards_is_refused_with_the_command(tmp_path):
    ns = key_of("y")
    TextCache(tmp_path, ns).put_many({"a": "b"})
    VectorCache(tmp_path / "v", ns).put_many({"a": [1.0]})
    d = tmp_path / ns
    for shard in (tmp_path / "v" / ns).glob("shard-*"):
        shard.rename(d / shard.name)
    (d / "meta.json").write_text("{")
    with pytest.raises(CacheError, match=rf"meta\.json: unreadable .*shards of another kind .*clear it with: "
                                         rf"rm -r {d}"):
        TextCache(tmp_path, ns)


def test_cli_prints_cache_errors_in_one_line(tmp_path, capsys, monkeypatch):
    import cocorec.cli as cli

    def boom(args):
        raise CacheError(f"{tmp_path}: meta.json says key='a' kind='text', expected ...; refusing\n(clear it)")

    monkeypatch.setattr(cli, "cmd_demo", boom)
    assert main(["demo"]) == 2
    assert _one_error_line(capsys).startswith(f"error: {tmp_path}: meta.json says key='a'")
