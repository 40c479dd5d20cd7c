"""The CoCo method on a tiny random LM: LoRA gradient routing, checkpoints, guard, variants, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cocorec.coco.judge import CONTRADICTION
from cocorec.knowledge.base import build_method
from cocorec.models import build_model
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig, Trainer, to_device

pytestmark = pytest.mark.filterwarnings("ignore:.*user texts exceed")

SMALL = dict(lm="tiny", codebook_size=4, max_text_tokens=48, lm_users_per_step=6, contradiction_users_per_step=3,
             lm_batch_users=16, readout_dim=16, readout_hidden=32, knowledge_dim=8, guard_min_samples=1)
TRAIN = TrainConfig(epochs=1, batch_size=64, eval_batch_size=512, threads=1, patience=1)


def _setup(data, method="coco", seed=0, **kw):
    torch.manual_seed(seed)
    m = build_method(method, seed=seed, **{**SMALL, **kw})
    model = build_model("din", data.spec, knowledge_dims=m.knowledge_dims, hidden_units=(32, 16))
    tr = Trainer(model, m, data, TRAIN, quiet=True)   # builds the method: attach + prepare
    return tr, m, model


def _batch(data, tr, n=64):
    """A training batch on the trainer's device (CUDA where the suite runs on a GPU machine)."""
    return to_device(data.batch("train", np.arange(n)), tr.device)


def _step(tr, m, model, batch, step=1):
    loss, logs = m.training_loss(model, batch, step)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optimizer.step()
    return logs


def _lora(m):
    return [p.detach().clone() for p in m.lora_parameters]


@pytest.mark.parametrize("delta, contradicts", [(5.0, False), (-5.0, True)])
def test_lora_trains_only_on_contradicting_samples(toy_data, delta, contradicts):
    tr, m, model = _setup(toy_data, delta=delta, knowledge_dropout=0.0)
    batch = _batch(toy_data, tr)
    before = _lora(m)
    _step(tr, m, model, batch)                        # collaboration step: LoRA frozen
    assert all(p.grad is None for p in m.lora_parameters)
    assert all(torch.equal(a, b) for a, b in zip(before, _lora(m)))
    prompts = m.codebook.prompts.detach().clone()
    m.scheduler.phase = CONTRADICTION
    logs = _step(tr, m, model, batch, step=2)
    after = _lora(m)
    changed = any(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed is contradicts
    assert (logs["contradicting_rows"] > 0) is contradicts
    assert m.n_lora_updates == int(contradicts)
    if contradicts:   # LoRA got exactly the gradient of the contradiction loss (hook), others the full loss
        assert all(torch.equal(p.grad, g) for p, g in zip(m.lora_parameters, m._lora_override))
        assert not torch.equal(prompts, m.codebook.prompts.detach())


def test_checkpoint_round_trip_gives_identical_scores(toy_data, tmp_path):
    # Force contradiction phases so LoRA moves and the user-text caches must be rebuilt after loading.
    kw = dict(delta=-1.0, rate_threshold=-1.0, rate_window=1, warmup_steps=1, cooldown_steps=1, phase_steps=1)
    tr, m, model = _setup(toy_data, **kw)
    tr.fit()
    assert m.n_lora_updates > 0
    tr.save_checkpoint(tmp_path / "ckpt")
    ref = tr.predict("test")["prob"]
    tr2, m2, _ = _setup(toy_data, seed=1, **kw)
    assert not np.allclose(tr2.predict("test")["prob"], ref)
    tr2.load_checkpoint(tmp_path / "ckpt")
    np.testing.assert_allclose(tr2.predict("test")["prob"], ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(m2.guard.enabled, m.guard.enabled)


class _FakeTrainer:
    """Validation predictions where knowledge ruins one group's ranking and leaves the others alone."""

    def __init__(self, users, labels, good, bad_users, shift_without=1.0):
        self.users, self.labels = users, labels
        rng = np.random.default_rng(0)
        in_bad = np.isin(users, bad_users)
        self.bad = np.where(in_bad, rng.random(len(users)), good)
        # Without knowledge the bad group ranks well inside itself; shift_without < 1 pushes its
        # scores below everyone else's, so switching its knowledge off would hurt the overall AUC.
        self.good = np.where(in_bad, good * shift_without, good)

    def predict(self, split, use_knowledge=True):
        return {"prob": self.bad if use_knowledge else self.good, "label": self.labels, "user": self.users}


def test_group_guard_disables_knowledge_where_it_hurts(toy_data):
    tr, m, model = _setup(toy_data)
    groups = np.asarray(toy_data.user_groups[m.guard.grouping])
    hurt = m.guard.names[0]
    users = np.repeat(np.arange(toy_data.n_users), 20)
    rng = np.random.default_rng(1)
    labels = (rng.random(len(users)) > 0.5).astype(np.float32)
    good = np.clip(labels * 0.5 + rng.random(len(users)) * 0.5, 0, 1)
    m.on_fit_end(_FakeTrainer(users, labels, good, np.flatnonzero(groups == hurt)).predict)
    rep = m.diagnostics()["guard"]
    assert rep["disabled"] == [hurt]
    assert all(r["knowledge"] == "on" for g, r in rep["groups"].items() if g != hurt)
    batch = to_device(toy_data.batch("train", np.arange(toy_data.split("train").n)), tr.device)
    with torch.no_grad():
        k = m(batch)[0].cpu()
    in_hurt = torch.from_numpy(groups[batch["user"].cpu().numpy()] == hurt)
    assert in_hurt.any() and (~in_hurt).any()
    assert k[in_hurt].abs().sum() == 0 and (k[~in_hurt].abs().sum(-1) > 0).all()
    assert rep["val_auc_guarded"] > rep["val_auc_all_on"]
    # Same per-group harm, but the group's no-knowledge scores do not rank against the others': kept on.
    m.on_fit_end(_FakeTrainer(users, labels, good, np.flatnonzero(groups == hurt), shift_without=0.01).predict)
    rep = m.diagnostics()["guard"]
    assert rep["groups"][hurt]["harmed"] and rep["disabled"] == []
    assert rep["groups"][hurt]["overall_auc_if_off"] < rep["val_auc_all_on"]


@pytest.mark.parametrize("method", ["static", "coco-novq", "coco-nojudge"])
def test_variants_train_a_step(toy_data, method):
    tr, m, model = _setup(toy_data, method=method)
    logs = _step(tr, m, model, _batch(toy_data, tr))
    assert np.isfinite(logs["bce"])
    codes = m.code_assignments()
    if method == "static":
        assert m.cfg.codebook.codebook_size == 1 and set(codes.tolist()) == {0} and not m.cfg.guard.guard
    if method == "coco-novq":
        assert torch.equal(codes, m._fixed_codes) and logs["vq"] == 0.0
    if method in ("static", "coco-nojudge"):
        assert m.lora_parameters == []


def test_coco_trains_end_to_end_on_din(toy_data, tmp_path):
    cfg = RunConfig(dataset="toy", backbone="din", method="coco", seed=0, output=str(tmp_path / "run"),
                    results=str(tmp_path / "results.jsonl"), train=TrainConfig(**{**TRAIN.__dict__, "epochs": 2}),
                    model={"hidden_units": (32, 16)}, method_args={**SMALL, "warmup_steps": 1, "rate_window": 1},
                    quiet=True)
    metrics = run(cfg, data=toy_data)
    for split in ("val", "test", "test_no_knowledge"):
        assert 0.0 <= metrics[split]["auc"] <= 1.0
    d = metrics["diagnostics"]
    assert d["codebook"]["size"] == 4 and sum(d["codebook"]["users_per_code"]) == toy_data.n_users
    assert len(d["contradiction"]["rate_by_epoch"]) == 2 and d["contradiction"]["rate_steps"]
    assert d["kv_cache"]["bytes"] > 0 and d["guard"]["groups"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["config"]["method_config"]["codebook_size"] == 4


@pytest.mark.parametrize("scope", ["all", "suffix"])
def test_phase_rebuilds_text_caches_once_after_the_phase(toy_data, scope):
    kw = dict(delta=-5.0, rate_threshold=-1.0, rate_window=1, warmup_steps=1, cooldown_steps=100, phase_steps=3,
              knowledge_dropout=0.0, lora_scope=scope, kv_shared=False)   # counts builds
    tr, m, model = _setup(toy_data, **kw)
    batch = _batch(toy_data, tr)
    _step(tr, m, model, batch, step=0)                 # collaboration: fills the bank (builds train users)
    built = m.kv.users_built
    n_train = len(m._train_users)
    assert built >= n_train and m.scheduler.phase == CONTRADICTION
    for step in (1, 2, 3):                             # the phase: LoRA moves, nothing is rebuilt
        _step(tr, m, model, batch, step=step)
        assert m.kv.users_built == built
    assert m.scheduler.phase != CONTRADICTION and m.n_lora_updates == 3
    refreshes = m.timing["bank_refreshes"]
    _step(tr, m, model, batch, step=4)                 # back to collaboration: one rebuild + bank refresh
    assert m.timing["bank_refreshes"] == refreshes + 1
    if scope == "all":
        assert m.lm_version() != "base" and m.kv.users_built == built + n_train
    else:                                              # the text is read by the base LM: no rebuild at all
        assert m.lm_version() == "base" and m.kv.users_built == built
    _step(tr, m, model, batch, step=5)
    assert m.timing["bank_refreshes"] == refreshes + 1


def _draws(m):
    """What a CoCo run draws: prompt init, LoRA init, the fixed codes, and its next random numbers."""
    return [m.codebook.prompts.detach().clone(), *[p.detach().clone() for p in m.lora_parameters],
            m._fixed_codes.clone(), torch.rand(8, generator=m._gen)]


def test_the_run_seed_drives_every_coco_draw(toy_data):
    from cocorec.config import ConfigError, check_kwargs
    from cocorec.knowledge.base import METHODS

    a, b, c = (_draws(_setup(toy_data, seed=s)[1]) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(not torch.equal(x, z) for x, z in zip(a, c) if x.float().std() > 0)
    with pytest.raises(ConfigError, match="unknown key 'seed'"):   # one seed: the run's, never a method key
        check_kwargs(METHODS["coco"], {"seed": "1"}, "method coco")


def test_same_seed_same_coco_run_and_the_judge_sees_corrupted_users(toy_data, tmp_path):
    def go(seed, name):
        cfg = RunConfig(dataset="toy", backbone="din", method="coco", seed=seed, output=str(tmp_path / name),
                        results=None, train=TrainConfig(**{**TRAIN.__dict__, "epochs": 1}),
                        model={"hidden_units": (32, 16)}, quiet=True,
                        method_args={**SMALL, "source": "template", "corrupt": 0.5, "warmup_steps": 1})
        return run(cfg, data=toy_data)

    a, b, c = go(0, "a"), go(0, "b"), go(1, "c")
    assert a["test"] == b["test"] and a["test"]["auc"] != c["test"]["auc"]
    judge = a["diagnostics"]["judge"]
    assert judge["source"] == "template+corrupt0.5" and judge["users_judged"] > 0
    assert 0.0 <= judge["corrupt_user_auroc"] <= 1.0 and set(judge["by_group"]) == {"corrupted", "clean"}
    assert 0.0 <= judge["helps_rate"] <= 1.0 and "p50" in judge["per_user_contradiction_rate"]
    assert set(a["groups"]["test"]["corrupt"]) <= {"corrupted", "clean"}
    # the final pass judges every training user once with the trained model (auto: corrupt > 0)
    final = judge["final"]
    assert final["users_judged"] == len(np.unique(toy_data.split("train").user))
    assert final["samples_judged"] == toy_data.split("train").n
    assert 0.0 <= final["corrupt_user_auroc_drop"] <= 1.0 and 0.0 <= final["corrupt_user_auroc"] <= 1.0


@pytest.mark.parametrize("bank", ["states", "knowledge"])
def test_a_bank_of_states_trains_the_readout_on_users_the_lm_did_not_run(toy_data, bank):
    """No live user: with a bank of prompt states the read-out still runs (and learns) on every user of
    the batch; with a bank of knowledge vectors it gets no gradient at all."""
    tr, m, model = _setup(toy_data, bank=bank, lm_users_per_step=0, knowledge_dropout=0.0)
    loss, logs = m.training_loss(model, _batch(toy_data, tr), 1)
    assert logs["live_users"] == 0.0
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in m.readout.parameters()]
    if bank == "states":
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert all(g is None or g.abs().sum() == 0 for g in grads)
    assert m.bank.fills == 1 and not m.bank.stale(m._bank_key())


def test_static_is_one_knowledge_vector_for_every_user(toy_data):
    tr, m, model = _setup(toy_data, method="static")
    batch = _batch(toy_data, tr, n=200)
    with torch.no_grad():
        k = m(batch)[0]
    assert len(torch.unique(batch["user"])) > 5
    torch.testing.assert_close(k, k[:1].expand_as(k))
    assert m.cfg.user_text == "none"


def test_the_trainer_adds_the_backbones_auxiliary_loss_under_coco(toy_data):
    # DIEN's interest-extractor loss is set by its training forward; the trainer composes the loss
    # (the method's + the backbone's add_loss), so it reaches DIEN under CoCo as under every method
    torch.manual_seed(0)
    m = build_method("coco", seed=0, **SMALL)
    model = build_model("dien", toy_data.spec, knowledge_dims=m.knowledge_dims, hidden_units=(32, 16),
                        aux_loss_weight=0.5)
    tr = Trainer(model, m, toy_data, TrainConfig(epochs=1, batch_size=64, eval_batch_size=512, threads=1,
                                                 patience=1, max_steps_per_epoch=2), quiet=True)
    loss, logs = m.training_loss(model, _batch(toy_data, tr), 1)
    assert "backbone_aux" not in logs and model.add_loss() is not None and float(model.add_loss()) > 0
    before = [p.detach().clone() for p in model.aux_net.parameters()]
    tr.fit()
    assert tr.history[0]["train_backbone_aux"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.aux_net.parameters()))   # it was trained



def test_the_bank_refill_shows_its_progress_in_a_log_too(toy_data, capsys):
    tr, m, model = _setup(toy_data, lm_batch_users=4)
    capsys.readouterr()
    assert m.kv.progress is False   # the quiet trainer of _setup silenced it
    m.kv.progress = None            # a run that is not quiet: a bar in a terminal, lines in a log (stderr here)
    m.refresh_bank()
    err, n = capsys.readouterr().err, len(m._train_users)
    assert f"CoCo bank refill: 100% {n}/{n} user [" in err and n > 4   # users done / all, then the timing
    m.kv.progress = False
    m.refresh_bank()
    assert capsys.readouterr().err == ""


NO_PHASE = {"max_phases": 0}
PHASE = {"delta": -5.0, "rate_threshold": -1.0, "rate_window": 1, "warmup_steps": 1, "phase_steps": 2,
         "cooldown_steps": 100}


@pytest.mark.parametrize("judge", [
    pytest.param(NO_PHASE, id="no-phase"),
    pytest.param(PHASE, id="after-a-phase"),
    pytest.param({**PHASE, "bank": "knowledge", "reset_every": 2}, id="knowledge-bank-and-code-resets"),
])
def test_coco_run_killed_after_an_epoch_resumes_to_the_uninterrupted_run(toy_data, tmp_path, monkeypatch, judge):
    """A resumed CoCo run (scheduler, LoRA, bank, the method's generator and the trainer's RNG restored
    from ``last/``) trains to the very weights of the uninterrupted one."""
    from safetensors.torch import load_file

    from cocorec.train.run import execute
    from cocorec.train.trainer import Trainer

    def cfg(name):
        return RunConfig(dataset="toy", backbone="din", method="coco", seed=0, output=str(tmp_path / name),
                         results=None, train=TrainConfig(**{**TRAIN.__dict__, "epochs": 3, "patience": 5}),
                         model={"hidden_units": (32, 16)}, quiet=True, method_args={**SMALL, **judge})

    full = run(cfg("full"), data=toy_data)
    assert full["diagnostics"]["contradiction"]["n_phases"] == (0 if judge is NO_PHASE else 1)
    save_last = Trainer._save_last

    def killed(self):
        save_last(self)
        if self.epoch == 2:
            raise KeyboardInterrupt   # after epoch 2's state is on disk (a phase, if any, ran in epoch 1)

    monkeypatch.setattr(Trainer, "_save_last", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg("resumed"), data=toy_data)
    monkeypatch.setattr(Trainer, "_save_last", save_last)
    resumed = execute(cfg("resumed"), data=toy_data)
    assert resumed.status == "trained"
    a, b = (load_file(str(tmp_path / n / "last" / "state.safetensors")) for n in ("full", "resumed"))
    assert a.keys() == b.keys()
    weights = [k for k in a if k.startswith(("model/", "method/")) and "rng" not in k]
    assert len(weights) > 20 and [k for k in weights if not torch.equal(a[k], b[k])] == []
    for split in ("val", "test", "test_no_knowledge"):
        assert resumed.metrics[split] == full[split], split

    def val_aucs(m):
        return [h["val_auc"] for h in m["train"]["history"]]

    assert val_aucs(resumed.metrics) == val_aucs(full) and len(val_aucs(full)) == 3   # epoch 3 trains after the resume


def test_a_phase_decided_too_near_an_epochs_end_waits_and_runs_all_its_steps(toy_data, tmp_path):
    """The epoch's end ends a phase, so one decided with fewer than ``phase_steps`` steps left would be
    cut short (ml-100k split 44: 61-step epochs, warm-up 60, one LoRA update instead of 10): it waits
    for the next epoch instead and runs whole."""
    train = TrainConfig(**{**TRAIN.__dict__, "epochs": 2, "patience": 5, "batch_size": 32})
    steps = math.ceil(toy_data.split("train").n / train.batch_size)
    assert steps >= 5
    judge = {"delta": -5.0, "rate_threshold": -1.0, "rate_window": 1, "warmup_steps": steps - 1, "phase_steps": 3,
             "cooldown_steps": 100, "max_phases": 1, "knowledge_dropout": 0.0}
    cfg = RunConfig(dataset="toy", backbone="din", method="coco", seed=0, output=str(tmp_path / "run"),
                    results=None, train=train, model={"hidden_units": (32, 16)}, quiet=True,
                    method_args={**SMALL, **judge})
    d = run(cfg, data=toy_data)["diagnostics"]["contradiction"]
    assert d["n_lora_updates"] == 3 and d["n_phases"] == 1
    assert [(e["event"], e["step"]) for e in d["phases"]] == [("start", steps + 1), ("end", steps + 4)]
    assert d["phase_steps"] == [steps + 1, steps + 2, steps + 3]   # the first 3 steps of epoch 2, after one
