"""An implicit-feedback dataset (a generated app-usage log) through `cocorec bench` (base and KAR) and
`cocorec report`: the report has both rows, and the LM is asked about apps with their use counts, never
about movies and never with a count shown as a rating."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cocorec.bench.grid import read_jsonl
from cocorec.cli import main
from cocorec.knowledge import kar
from tests.data.helpers import edit_spec, write_implicit

SYSTEM = "You are an app expert. Answer briefly and concretely."


class RecordingLM:
    """The tiny random LM, recording every prompt and system message it is given."""

    def __init__(self) -> None:
        from cocorec.knowledge.lm import tiny_lm

        self.lm = tiny_lm(seed=0)
        self.identity, self.device = self.lm.identity, self.lm.device
        self.prompts: list[str] = []
        self.systems: set[str] = set()

    def generate(self, prompts, **kw):
        self.prompts += list(prompts)
        self.systems.add(kw.get("system"))
        return self.lm.generate(prompts, **kw)


def test_implicit_usage_log_through_bench_and_report(tmp_path: Path, cache_dir: Path, monkeypatch, capsys) -> None:
    d = write_implicit(tmp_path / "apps", n_users=40, n_items=30, per_user=12, seed=3)
    edit_spec(d, lambda s: s["domain"].update(tag_label="Category"))
    made: list[RecordingLM] = []

    def make_lm(name, **kw):
        assert name == "tiny"
        made.append(RecordingLM())
        return made[-1]

    monkeypatch.setenv("COCOREC_CACHE", str(tmp_path / "cache"))    # a fresh knowledge cache: every text generated
    monkeypatch.setattr(kar, "make_lm", make_lm)
    grid = tmp_path / "apps.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "apps", "datasets": [str(d)], "backbones": ["deepfm"], "methods": ["base", "kar"], "seeds": [0],
        "overrides": {"train.epochs": 1, "train.threads": 1, "train.batch_size": 128},
        "method_overrides": {"kar": {"method.lm": "tiny", "method.encoder": "tiny", "method.max_new_tokens": 4}}}))
    res, out = tmp_path / "results.jsonl", tmp_path / "runs"
    assert main(["bench", "--grid", str(grid), "--results", str(res), "--out-dir", str(out), "--quiet",
                 "--no-report"]) == 0
    lines = read_jsonl(res)
    assert sorted(r["method"] for r in lines) == ["base", "kar"]
    for r in lines:
        assert math.isfinite(r["metrics"]["test"]["auc"]) and 0.0 <= r["metrics"]["test"]["auc"] <= 1.0
    capsys.readouterr()
    report = tmp_path / "REPORT.md"
    assert main(["report", "--results", str(res), "--output", str(report), "--no-plots"]) == 0
    text = report.read_text()
    assert "| deepfm | base | 1 |" in text and "| deepfm | kar | 1 |" in text

    # What the LM was asked: the domain's words, the use counts, no rating.
    from cocorec.data import prepare

    data = prepare(str(d))
    (lm,) = made
    assert lm.systems == {SYSTEM}
    user_prompts = [p for p in lm.prompts if p.startswith("A user")]
    item_prompts = [p for p in lm.prompts if p.startswith("Describe the app")]
    assert len(user_prompts) == data.n_users and len(item_prompts) == data.spec.n_items - 1
    log = pd.read_csv(d / "usage.txt", sep="\t")
    for u in range(data.n_users):
        prompt = kar.user_prompt(data, u)
        assert prompt in user_prompts
        head, history = prompt.splitlines()[:2]
        assert "interacted with these apps" in head and "number of times the user opened the app" in head
        own = log[log["uid"] == data.user_ids[u]].sort_values("ts", kind="stable").head(len(data.llm_history(u)))
        titles = [f"App {int(a[1:])}" for a in own["app"]]
        assert history.split("; ") == [f"{t} ({c})" for t, c in zip(titles, own["uses"])]
    every = "\n".join(lm.prompts)
    for word in ("movie", "director", "rated", "rating", "(bad)", "/5", "liked"):
        assert word not in every
    assert all("category, purpose, and price" in p for p in user_prompts + item_prompts)
    knowledge = next((Path(r["output"]) / "knowledge.json") for r in lines if r["method"] == "kar")
    assert SYSTEM in knowledge.read_text()
    assert np.isfinite(lines[0]["metrics"]["test"]["logloss"])
