"""CoCo's judge : confidence, contradiction mask, rate tracking, phase schedule.

* Confidence in the true label: ``c(p) = y p + (1 - y)(1 - p)``.
* A sample *contradicts* when the knowledge lowers that confidence by more than ``delta``:
  ``c(p+) + delta < c(p0)`` (p+ with knowledge, p0 with the knowledge field zeroed).
* Per training user (:class:`UserJudgeStats`): how often the knowledge hurt or helped, its mean
  *confidence drop* ``mean(c(p0) - c(p+))`` (the count rate without the threshold), and its
  *direction score* ``-mean(p+ - p0) * mean(y - p0)``: positive when the knowledge pushes the user's
  predictions against the way the user's labels deviate from the knowledge-free prediction. Count
  rates threshold each sample at ``delta``; the drop and direction scores sum small shifts over the
  user's samples, which is where a corrupted text shows (docs/coco.md, "The judge").
* :func:`judge_predictions`: that comparison on any predictions (also the final judge pass over the
  training users with the trained model, ``CoCo.on_fit_end``).
* :func:`judge_batch`: one judge pass over a batch (the backbone with and without the knowledge).
* :class:`PhaseScheduler` alternates *collaboration* phases (LoRA frozen, the user-text KV cache
  live) with a *contradiction* phase of ``phase_steps`` steps (LoRA trained on contradicting
  samples) whenever the mean rate of the last ``window`` steps exceeds ``threshold``; after a
  contradiction phase the caches must be rebuilt (the LM changed). ``cooldown_steps`` collaboration
  steps separate phases, and at most ``max_phases`` run (each costs a cache rebuild).

Example:
    >>> import torch
    >>> y = torch.tensor([1.0, 0.0, 1.0])
    >>> contradiction_mask(torch.tensor([0.6, 0.3, 0.9]), torch.tensor([0.8, 0.2, 0.85]), y, delta=0.05).tolist()
    [True, True, False]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cocorec.config import ConfigError

COLLABORATION = "collaboration"
CONTRADICTION = "contradiction"


def confidence(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Probability given to the true label."""
    return y * p + (1 - y) * (1 - p)


def contradiction_mask(p_plus: torch.Tensor, p_zero: torch.Tensor, y: torch.Tensor, delta: float) -> torch.Tensor:
    """True where knowledge lowers the confidence in the true label by more than ``delta``."""
    return confidence(p_plus, y) + delta < confidence(p_zero, y)


def helps_mask(p_plus: torch.Tensor, p_zero: torch.Tensor, y: torch.Tensor, delta: float) -> torch.Tensor:
    """True where knowledge raises the confidence in the true label by more than ``delta`` (the
    symmetric side of :func:`contradiction_mask`)."""
    return confidence(p_plus, y) > confidence(p_zero, y) + delta


@dataclass
class JudgeConfig:
    """The judge's and the phase schedule's settings (config keys: ``--set method.delta=0.05``).

    ``final_pass``: after training, judge every training user once more with the trained model and
    fresh knowledge (the per-user scores of the online judge are sums over the whole run, most of it
    with an untrained read-out). ``auto``: when the run's source has a ground truth to measure it
    against (``corrupt > 0``); it costs one pass of the LM over the training users' texts.

    Example:
        >>> JudgeConfig(rate_threshold=0.2).scheduler().threshold
        0.2
    """

    judge: bool = True                     # False: measure contradictions, never train LoRA (coco-nojudge)
    delta: float = 0.02                    # confidence drop that makes a sample contradict (< 0: every sample)
    rate_threshold: float = 0.1            # recent contradiction rate that starts a phase (< 0: at once)
    rate_window: int = 10                  # steps averaged into the recent rate
    phase_steps: int = 10                  # steps of a contradiction phase
    cooldown_steps: int = 60               # collaboration steps between phases
    warmup_steps: int = 60                 # steps before the first phase may start
    max_phases: int = 1
    contradiction_users_per_step: int = 8  # users whose full LM pass trains LoRA in a phase step
    final_pass: str = "auto"               # "auto" (when corrupt > 0), "on", "off"

    def __post_init__(self) -> None:
        if min(self.rate_window, self.phase_steps, self.contradiction_users_per_step) < 1 or \
                min(self.cooldown_steps, self.warmup_steps, self.max_phases) < 0:
            raise ConfigError("rate_window, phase_steps and contradiction_users_per_step must be >= 1; "
                             "cooldown_steps, warmup_steps and max_phases >= 0")
        if self.final_pass not in ("auto", "on", "off"):
            raise ConfigError(f"final_pass must be auto, on or off (got {self.final_pass!r})")

    def scheduler(self) -> "PhaseScheduler":
        return PhaseScheduler(threshold=self.rate_threshold, window=self.rate_window, phase_steps=self.phase_steps,
                              cooldown_steps=self.cooldown_steps, max_phases=self.max_phases,
                              warmup_steps=self.warmup_steps, enabled=self.judge)


@dataclass
class JudgeOutput:
    """One judge pass: per sample, whether the knowledge contradicts / helps, p+ - p0, y - p0 and
    c(p0) - c(p+) (the confidence in the true label the knowledge cost)."""

    contradicts: torch.Tensor
    helps: torch.Tensor
    shift: torch.Tensor
    residual: torch.Tensor
    drop: torch.Tensor


def judge_predictions(p_plus: torch.Tensor, p_zero: torch.Tensor, y: torch.Tensor, delta: float) -> JudgeOutput:
    """Compare predictions with (p+) and without (p0) the knowledge, sample by sample.

    Example:
        >>> out = judge_predictions(torch.tensor([0.6, 0.3]), torch.tensor([0.8, 0.2]), torch.tensor([1.0, 0.0]), 0.05)
        >>> out.contradicts.tolist(), [round(x, 2) for x in out.drop.tolist()]
        ([True, True], [0.2, 0.1])
    """
    return JudgeOutput(contradiction_mask(p_plus, p_zero, y, delta), helps_mask(p_plus, p_zero, y, delta),
                       p_plus - p_zero, y - p_zero, confidence(p_zero, y) - confidence(p_plus, y))


@torch.no_grad()
def judge_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor], knowledge: list[torch.Tensor],
                delta: float) -> JudgeOutput:
    """The backbone's predictions on ``batch`` with ``knowledge`` (p+) and with it zeroed (p0), in eval
    mode (no dropout: the comparison is of the knowledge alone), compared sample by sample."""
    was = model.training
    model.eval()
    try:
        p_plus = torch.sigmoid(model(batch, knowledge).float())
        p_zero = torch.sigmoid(model(batch, None).float())
    finally:
        model.train(was)
    return judge_predictions(p_plus, p_zero, batch["label"].to(p_plus.device).float(), delta)


class UserJudgeStats:
    """Per-user sums over training: judged samples, contradicting ones, helped ones, and the sums of
    p+ - p0 (the knowledge's shift) and of y - p0 (what the knowledge-free model missed).

    Example:
        >>> s = UserJudgeStats(3)
        >>> s.add(torch.tensor([0, 0, 2]), torch.tensor([True, False, False]), torch.tensor([False, True, False]))
        >>> s.rates()[0].tolist()
        [0.5, 0.0, 0.0]
        >>> s.add(torch.tensor([1, 1]), torch.tensor([False, False]), torch.tensor([False, False]),
        ...       shift=torch.tensor([0.2, 0.2]), residual=torch.tensor([-0.5, -0.3]))
        >>> round(float(s.direction_score()[1]), 4)    # pushed up a user whose labels sit below p0
        0.08
        >>> s.add(torch.tensor([2]), torch.tensor([False]), torch.tensor([False]), drop=torch.tensor([0.01]))
        >>> [round(float(x), 3) for x in s.drop_score()]   # mean confidence the knowledge cost
        [0.0, 0.0, 0.005]
    """

    ROWS = ("judged", "contradicting", "helped", "shift", "residual", "drop")

    def __init__(self, n_users: int) -> None:
        self.counts = torch.zeros(len(self.ROWS), n_users, dtype=torch.float64)

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> "UserJudgeStats":
        """From saved sums (older checkpoints hold only the first three rows)."""
        s = cls(counts.shape[1])
        s.counts[: counts.shape[0]] = counts.cpu().double()
        return s

    @classmethod
    def from_predictions(cls, n_users: int, users: Any, p_plus: Any, p_zero: Any, y: Any,
                         delta: float) -> "UserJudgeStats":
        """Per-user sums of one judge pass over whole-split predictions (arrays or tensors): the final
        judge pass of ``CoCo.on_fit_end`` and of its post-hoc script."""
        s = cls(n_users)
        t = [torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (p_plus, p_zero, y)]
        s.add_output(torch.as_tensor(np.asarray(users, dtype=np.int64)), judge_predictions(*t, delta))
        return s

    def add(self, users: torch.Tensor, contradicts: torch.Tensor, helps: torch.Tensor,
            shift: torch.Tensor | None = None, residual: torch.Tensor | None = None,
            drop: torch.Tensor | None = None) -> None:
        u = users.cpu()
        zero = torch.zeros_like(u, dtype=torch.float64)
        for row, v in enumerate((torch.ones_like(u, dtype=torch.float64), contradicts.cpu().double(),
                                 helps.cpu().double(), zero if shift is None else shift.cpu().double(),
                                 zero if residual is None else residual.cpu().double(),
                                 zero if drop is None else drop.cpu().double())):
            self.counts[row].index_add_(0, u, v)

    def add_output(self, users: torch.Tensor, out: JudgeOutput) -> None:
        self.add(users, out.contradicts, out.helps, out.shift, out.residual, out.drop)

    def rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(contradiction rate, helps rate) per user (0 for users never judged)."""
        n = self.counts[0].clamp_min(1.0)
        return self.counts[1] / n, self.counts[2] / n

    def drop_score(self) -> torch.Tensor:
        """``mean(c(p0) - c(p+))`` per user: the confidence in the true label the knowledge cost on average."""
        return self.counts[5] / self.counts[0].clamp_min(1.0)

    def direction_score(self) -> torch.Tensor:
        """``-mean(p+ - p0) * mean(y - p0)`` per user: > 0 where the knowledge pushes against the labels."""
        n = self.counts[0].clamp_min(1.0)
        return -(self.counts[3] / n) * (self.counts[4] / n)

    def summary(self, groups: list[str] | None = None) -> dict[str, Any]:
        """Rates over the judged users (sample-weighted and per-user quantiles); with ``groups`` (per
        user ``corrupted`` / ``clean``) the rates per group and the AUROC of each per-user score at
        telling corrupted users from clean ones (``_net``: contradiction rate minus helps rate;
        ``_direction``: :meth:`direction_score`)."""
        from cocorec.eval.metrics import auc

        judged = self.counts[0] > 0
        c, h = self.rates()
        n = self.counts[0][judged]
        out: dict[str, Any] = {"users_judged": int(judged.sum()), "samples_judged": int(n.sum())}
        if not judged.any():
            return out
        for name, r in (("contradiction", c), ("helps", h)):
            v = r[judged].numpy()
            out[f"{name}_rate"] = float((r[judged] * n).sum() / n.sum())
            out[f"per_user_{name}_rate"] = {q: round(float(x), 4) for q, x in
                                            zip(("p10", "p50", "p90"), np.quantile(v, [0.1, 0.5, 0.9]))}
        if groups is not None:
            g = np.asarray(groups, dtype=object)[judged.numpy()]
            bad = (g == "corrupted").astype(float)
            out["by_group"] = {k: {"users": int((g == k).sum()),
                                   "contradiction_rate": float(c[judged].numpy()[g == k].mean()),
                                   "helps_rate": float(h[judged].numpy()[g == k].mean())}
                               for k in ("corrupted", "clean") if (g == k).any()}
            out["corrupt_user_auroc"] = auc(bad, c[judged].numpy())
            out["corrupt_user_auroc_helps"] = auc(1.0 - bad, h[judged].numpy())
            # both sides at once: corrupted users are hurt more often *and* helped less often
            out["corrupt_user_auroc_net"] = auc(bad, (c - h)[judged].numpy())
            out["corrupt_user_auroc_direction"] = auc(bad, self.direction_score()[judged].numpy())
            out["corrupt_user_auroc_drop"] = auc(bad, self.drop_score()[judged].numpy())
        return out


class PhaseScheduler:
    """Tracks the contradiction rate per step and decides the phase of the next step.

    Example:
        >>> s = PhaseScheduler(threshold=0.2, window=2, phase_steps=2, cooldown_steps=0)
        >>> [s.observe(r) for r in [0.1, 0.3, 0.3, 0.0, 0.0]]
        [None, None, 'start', None, 'end']
        >>> s.phase, s.n_phases
        ('collaboration', 1)
    """

    def __init__(self, threshold: float = 0.1, window: int = 10, phase_steps: int = 10, cooldown_steps: int = 60,
                 max_phases: int = 2, warmup_steps: int = 0, enabled: bool = True) -> None:
        self.threshold, self.window, self.phase_steps = threshold, window, phase_steps
        self.cooldown_steps, self.max_phases, self.warmup_steps = cooldown_steps, max_phases, warmup_steps
        self.enabled = enabled
        self.phase = COLLABORATION
        self.recent: deque[float] = deque(maxlen=max(window, 1))
        self.steps = 0               # steps observed
        self.steps_in_phase = 0
        self.n_phases = 0
        self.last_phase_end = -10**9
        self.epoch_end: int | None = None    # the step count at which the running epoch ends (begin_epoch)
        self.epoch_len = 0
        self.history: list[tuple[int, float, str]] = []   # (step, rate, phase of that step)
        self.events: list[dict[str, Any]] = []

    @property
    def recent_rate(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    def begin_epoch(self, steps: int) -> None:
        """The epoch about to run has ``steps`` steps. An epoch's end ends a phase (its evaluation needs
        the caches rebuilt with the new LM), so a phase starts only where all its ``phase_steps`` fit
        before that end (in an epoch shorter than a phase: only on its first step); otherwise it waits
        for the next epoch.

        Example:
            >>> s = PhaseScheduler(threshold=0.2, window=2, phase_steps=3, cooldown_steps=0)
            >>> s.begin_epoch(4)
            >>> [s.observe(0.5) for _ in range(4)]   # the window is full after step 2, with 2 steps left
            [None, None, None, None]
            >>> s.begin_epoch(4)
            >>> [s.observe(0.5) for _ in range(4)]
            ['start', None, None, 'end']
        """
        self.epoch_end, self.epoch_len = self.steps + int(steps), int(steps)

    def _fits(self) -> bool:
        if self.epoch_end is None:
            return True
        return self.epoch_end - self.steps >= max(1, min(self.phase_steps, self.epoch_len - 1))

    def observe(self, rate: float) -> str | None:
        """Record the rate of the step just run; returns ``"start"``/``"end"`` when the phase changes."""
        self.history.append((self.steps, float(rate), self.phase))
        self.recent.append(float(rate))
        self.steps += 1
        self.steps_in_phase += 1
        if self.phase == CONTRADICTION:
            if self.steps_in_phase >= self.phase_steps:
                return self.end_phase()
            return None
        if (self.enabled and self.n_phases < self.max_phases and self.steps >= self.warmup_steps
                and len(self.recent) >= self.window and self.steps - self.last_phase_end >= self.cooldown_steps
                and self.recent_rate > self.threshold and self._fits()):
            self.phase = CONTRADICTION
            self.steps_in_phase = 0
            self.n_phases += 1
            self.events.append({"step": self.steps, "event": "start", "recent_rate": round(self.recent_rate, 4)})
            return "start"
        return None

    def end_phase(self) -> str | None:
        """End a running contradiction phase (also called at an epoch's end).

        A phase that has not run a single step yet (decided on an epoch's last step, which only a
        scheduler never told the epoch's length by :meth:`begin_epoch` does) is cancelled instead: it
        does not count, and the next step may start it again.
        """
        if self.phase != CONTRADICTION:
            return None
        if self.steps_in_phase == 0:
            self.phase = COLLABORATION
            self.n_phases -= 1
            self.events.append({"step": self.steps, "event": "cancelled"})
            return "cancelled"
        self.phase = COLLABORATION
        self.steps_in_phase = 0
        self.last_phase_end = self.steps
        self.recent.clear()      # rates measured before the LM changed say nothing about it now
        self.events.append({"step": self.steps, "event": "end"})
        return "end"

    # ------------------------------------------------------------------ persistence (resume)
    def state(self) -> dict[str, Any]:
        return {"phase": self.phase, "recent": list(self.recent), "steps": self.steps,
                "steps_in_phase": self.steps_in_phase, "n_phases": self.n_phases,
                "last_phase_end": self.last_phase_end, "history": self.history, "events": self.events}

    def load(self, state: dict[str, Any]) -> None:
        self.phase = state["phase"]
        self.recent = deque(state["recent"], maxlen=max(self.window, 1))
        self.steps, self.steps_in_phase = state["steps"], state["steps_in_phase"]
        self.n_phases, self.last_phase_end = state["n_phases"], state["last_phase_end"]
        self.history = [tuple(h) for h in state["history"]]  # type: ignore[misc]
        self.events = list(state["events"])
