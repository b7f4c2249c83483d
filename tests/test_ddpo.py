"""DDPO's loss and per-prompt statistics on hand-made numbers."""
import math

import pytest

import torch

from flowalign.algorithms import ALGORITHMS
from flowalign.algorithms.ddpo import DDPO, PerPromptStatTracker, ddpo_step_loss


def test_registered():
    assert ALGORITHMS["ddpo"] is DDPO


def test_loss_zero_point_and_sign():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    old = lp.detach().clone()
    adv = torch.tensor([2.0, -1.0])
    loss, st = ddpo_step_loss(lp, old, adv, clip_range=0.2, adv_clip=5.0)
    # ratio 1: L = mean(-A) = -(2 - 1) / 2
    assert abs(loss.item() - (-0.5)) < 1e-7 and st["ratio_dev"] == 0.0 and st["clipfrac"] == 0.0
    loss.backward()
    # descending the loss raises the log-prob of the positive-advantage sample and lowers the other's
    assert lp.grad[0] < 0 < lp.grad[1]
    assert torch.allclose(lp.grad, torch.tensor([-1.0, 0.5]))


def test_loss_clipping():
    old = torch.zeros(4)
    lp = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, st = ddpo_step_loss(lp, old, adv, clip_range=0.2, adv_clip=5.0)
    # per sample max(-A r, -A clip(r)): A>0,r=1.5 -> -1.2 (clipped, no grad); A<0,r=1.5 -> 1.5 (unclipped);
    # A>0,r=0.5 -> -0.5 (unclipped); A<0,r=0.5 -> 0.8 (clipped, no grad)
    assert abs(loss.item() - (-1.2 + 1.5 - 0.5 + 0.8) / 4) < 1e-6
    assert st["clipfrac"] == 1.0
    loss.backward()
    assert lp.grad[0] == 0 and lp.grad[3] == 0          # clipped terms carry no gradient
    assert abs(lp.grad[1].item() - 1.5 / 4) < 1e-6 and abs(lp.grad[2].item() + 0.5 / 4) < 1e-6


def test_advantage_clip():
    lp = torch.zeros(1, requires_grad=True)
    loss, _ = ddpo_step_loss(lp, torch.zeros(1), torch.tensor([100.0]), clip_range=0.2, adv_clip=5.0)
    assert loss.item() == -5.0


def test_per_prompt_stats_and_batch_fallback():
    tr = PerPromptStatTracker(buffer_size=0, min_count=2)
    r = torch.tensor([1.0, 3.0, 10.0, 0.0])
    adv = tr.update(["a", "a", "b", "c"], r)
    # "a" has 2 rewards: its own mean 2, std 1; "b" and "c" have 1 < min_count: the batch's mean 3.5, std
    bstd = r.std(unbiased=False).item()
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0]), atol=1e-5)
    assert abs(adv[2].item() - (10 - 3.5) / (bstd + 1e-6)) < 1e-5
    assert abs(adv[3].item() - (0 - 3.5) / (bstd + 1e-6)) < 1e-5


def test_per_prompt_buffer_across_calls():
    tr = PerPromptStatTracker(buffer_size=3, min_count=3)
    tr.update(["p", "p"], torch.tensor([0.0, 2.0]))       # 2 < 3: batch stats
    adv = tr.update(["p"], torch.tensor([4.0]))          # buffer [0, 2, 4]: mean 2, std sqrt(8/3)
    assert abs(adv.item() - 2 / (math.sqrt(8 / 3) + 1e-6)) < 1e-5
    adv = tr.update(["p"], torch.tensor([4.0]))          # maxlen 3: buffer [2, 4, 4]
    m, s = 10 / 3, torch.tensor([2.0, 4.0, 4.0]).std(unbiased=False).item()
    assert abs(adv.item() - (4 - m) / (s + 1e-6)) < 1e-5


def test_the_trainer_hands_ddpo_prompt_keys_for_its_buffer(tiny_sd3, tmp_path):
    """With buffer_size > 0 the statistics are per prompt text across iterations: the second iteration's advantages
    of a prompt seen before are normalised by the history, not by the group alone."""
    import json

    from flowalign.trainer import Trainer
    from test_trainer import tiny_cfg

    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", algorithm={"name": "ddpo", "buffer_size": 16},
                         train={"iterations": 2, "lr": 1e-2, "batch_size": 8, "updates_per_iter": 1}))
    t.train_meta, t.by_task = t.train_meta[:1], {"only": [0]}  # one prompt: every group has the same text
    r1, g = torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])
    a1, st = t.algo.advantages_and_stats(r1, g, keys=["p"] * 4)
    assert st["tracked_prompts"] == 1 and a1.tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0], rel=1e-5)
    a2, _ = t.algo.advantages_and_stats(torch.tensor([1.0, 1.0, 1.0, 1.0]), g, keys=["p"] * 4)
    # history [0, 1, 0, 1, 1, 1, 1, 1]: mean 0.75, population std sqrt(3)/4
    assert a2.tolist() == pytest.approx([0.25 / (math.sqrt(3) / 4 + 1e-6)] * 4, rel=1e-5)
    t.run()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the run adds its one training prompt to the key "p" used above, in both iterations
    assert [r["tracked_prompts"] for r in recs] == [2.0, 2.0]
