"""The judge: confidence, contradiction mask on hand-made probabilities, phase schedule."""

from __future__ import annotations

import torch

from cocorec.coco.judge import COLLABORATION, CONTRADICTION, PhaseScheduler, confidence, contradiction_mask


def test_confidence_is_probability_of_true_label():
    p = torch.tensor([0.9, 0.9, 0.2])
    y = torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(confidence(p, y), torch.tensor([0.9, 0.1, 0.8]))


def test_contradiction_mask_hand_made():
    y = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    p_zero = torch.tensor([0.70, 0.70, 0.30, 0.30, 0.50])
    p_plus = torch.tensor([0.60, 0.69, 0.45, 0.10, 0.50])
    # 1: knowledge lowers confidence 0.70 -> 0.60 (> delta): contradicts; 2: only by 0.01: no;
    # 3: negative, p rises 0.30 -> 0.45: contradicts; 4: helps; 5: no change.
    assert contradiction_mask(p_plus, p_zero, y, delta=0.05).tolist() == [True, False, True, False, False]
    assert contradiction_mask(p_plus, p_zero, y, delta=0.0).tolist() == [True, True, True, False, False]


def test_scheduler_enters_and_leaves_contradiction_phase():
    s = PhaseScheduler(threshold=0.2, window=3, phase_steps=2, cooldown_steps=4, max_phases=2)
    for r in [0.5, 0.5]:
        assert s.observe(r) is None          # window not full yet
    assert s.observe(0.5) == "start" and s.phase == CONTRADICTION
    assert s.observe(0.5) is None
    assert s.observe(0.5) == "end" and s.phase == COLLABORATION
    events = [s.observe(0.5) for _ in range(4)]
    assert events == [None, None, None, "start"]   # cooldown of 4 steps, window refilled
    s.observe(0.5)
    assert s.end_phase() == "end"                  # cut short (e.g. by an epoch's end) after one step
    assert all(s.observe(0.9) is None for _ in range(10))   # max_phases reached
    assert s.n_phases == 2 and len(s.history) == 20
    # Low rates never start a phase; a disabled scheduler never does.
    low = PhaseScheduler(threshold=0.2, window=2, cooldown_steps=0)
    assert all(low.observe(0.1) is None for _ in range(5))
    off = PhaseScheduler(threshold=0.0, window=1, cooldown_steps=0, enabled=False)
    assert all(off.observe(1.0) is None for _ in range(5))


def test_scheduler_state_round_trip():
    s = PhaseScheduler(threshold=0.1, window=2, phase_steps=5, cooldown_steps=0)
    for r in [0.3, 0.3, 0.3]:
        s.observe(r)
    t = PhaseScheduler(threshold=0.1, window=2, phase_steps=5, cooldown_steps=0)
    t.load(s.state())
    assert t.state() == s.state() and t.phase == CONTRADICTION


def test_phase_decided_on_an_epochs_last_step_is_not_lost():
    s = PhaseScheduler(threshold=0.1, window=2, phase_steps=3, cooldown_steps=50, max_phases=1)
    s.observe(0.5)
    assert s.observe(0.5) == "start"
    assert s.end_phase() == "cancelled"          # the epoch ended before the phase ran a step
    assert s.n_phases == 0 and s.phase == COLLABORATION
    assert s.observe(0.5) == "start"             # no cooldown: it starts again at once
    s.observe(0.5)
    assert s.end_phase() == "end" and s.n_phases == 1   # a phase cut short by an epoch's end still counts


def test_user_judge_stats_separate_corrupted_users_by_each_side_and_both():
    from cocorec.coco.judge import UserJudgeStats

    s = UserJudgeStats(4)
    users = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # users 0 and 1 are corrupted: hurt once (user 0) or never helped (user 1); clean users are helped
    hurt = torch.tensor([True, False, False, False, False, False, False, False])
    helped = torch.tensor([False, False, False, False, True, True, True, False])
    s.add(users, hurt, helped)
    out = s.summary(["corrupted", "corrupted", "clean", "clean"])
    assert out["corrupt_user_auroc_helps"] == 1.0 and out["corrupt_user_auroc_net"] == 1.0
    assert out["corrupt_user_auroc"] == 0.75      # user 1 is hurt no more often than the clean users
    assert out["by_group"]["corrupted"]["users"] == 2


def test_direction_score_ranks_a_user_pushed_against_their_labels_first():
    from cocorec.coco.judge import UserJudgeStats

    s = UserJudgeStats(3)
    users = torch.tensor([0, 0, 1, 1, 2, 2])
    no = torch.zeros(6, dtype=torch.bool)
    # user 0: knowledge pushes up, labels sit above p0 (agrees); user 1: pushes up, labels below (against);
    # user 2: no shift at all
    shift = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.0, 0.0])
    residual = torch.tensor([0.3, 0.1, -0.4, -0.2, 0.5, -0.5])
    s.add(users, no, no, shift, residual)
    score = s.direction_score()
    assert score[1] > score[2] > score[0]
    out = s.summary(["clean", "corrupted", "clean"])
    assert out["corrupt_user_auroc_direction"] == 1.0


def test_judge_stats_load_the_three_rows_of_older_checkpoints():
    from cocorec.coco.judge import UserJudgeStats

    s = UserJudgeStats.from_counts(torch.tensor([[2.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert s.counts.shape == (len(UserJudgeStats.ROWS), 2) and s.rates()[0].tolist() == [0.5, 0.0]


def test_judge_batch_compares_the_backbone_with_and_without_knowledge():
    from cocorec.coco.judge import judge_batch

    class Toy(torch.nn.Module):   # logit = knowledge[0] (0 without knowledge)
        def forward(self, batch, knowledge):
            return torch.zeros(len(batch["label"])) if knowledge is None else knowledge[0][:, 0]

    batch = {"label": torch.tensor([1.0, 0.0, 1.0])}
    out = judge_batch(Toy(), batch, [torch.tensor([[2.0], [2.0], [-2.0]])], delta=0.05)
    assert out.helps.tolist() == [True, False, False] and out.contradicts.tolist() == [False, True, True]
    assert torch.allclose(out.residual, torch.tensor([0.5, -0.5, 0.5]))
