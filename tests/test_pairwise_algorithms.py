"""Pref-GRPO, PRDP and DRAGON: their pure parts on hand-made numbers (sign, zero point, clipping), DRAGON's
distributional rewards against their formulas and on real renders, every shipped config's 2-iteration run, and a
group-scope reward seeing whole groups across 2 processes."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

from flowalign.algorithms.dragon import contrast_sets, dpo_loss, kto_loss
from flowalign.algorithms.grpo import group_advantages
from flowalign.algorithms.prdp import make_pairs, prdp_loss
from flowalign.algorithms.pref_grpo import PrefGRPO, PrefGRPOConfig, group_win_rates
from flowalign.config import load_config
from flowalign.trainer import Trainer

from test_trainer import _launch, tiny_cfg  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).parent.parent


# ------------------------------------------------------------------------------------------ Pref-GRPO
def test_win_rates_by_hand_keyed_by_group_id():
    s = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.1, 0.5, 0.5, 0.9])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # 0.1 beats nobody; 0.5 beats 0.1, ties the other 0.5 (1/2), loses to 0.9: 1.5 / 3; 0.9 beats all three
    assert group_win_rates(s, g, "hard").tolist() == pytest.approx([0, 0.5, 0.5, 1] * 2)
    # one group of 8 (same values): 0.1 ties its twin, ...: (0 + 0.5) / 7 for the two 0.1s
    one = group_win_rates(s, torch.zeros(8, dtype=torch.long), "hard")
    assert one[0].item() == pytest.approx(0.5 / 7) and one[3].item() == pytest.approx((6 + 0.5) / 7)
    soft = group_win_rates(torch.tensor([0.0, 0.1]), torch.tensor([0, 0]), "soft", temperature=0.1)
    assert soft.tolist() == pytest.approx([1 / (1 + math.e), 1 / (1 + math.exp(-1))])
    assert group_win_rates(torch.tensor([0.3]), torch.tensor([7]), "hard").item() == 0.5  # a group of one


def test_ties_remove_the_illusory_advantage_of_tiny_gaps():
    """Group-normalised GRPO turns gaps of 0.001 into advantages of about +-1.2; Pref-GRPO with a tie margin
    calls them ties (win rate 1/2 for all) and gives no advantage, while a real gap in another group keeps its."""
    r = torch.tensor([0.500, 0.501, 0.502, 0.503, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    grpo = group_advantages(r, g)
    std = math.sqrt((1.5e-3 ** 2 + 0.5e-3 ** 2) / 2)  # population std of the first group: 0.00112
    assert grpo[3].item() == pytest.approx(1.5e-3 / (std + 1e-4), rel=1e-3)  # 1.23 from a gap of 0.003
    algo = PrefGRPO.__new__(PrefGRPO)
    algo.cfg = PrefGRPOConfig(tie_eps=0.01)
    adv, stats = algo.advantages_and_stats(r, g)
    assert adv[:4].abs().max() == 0
    assert adv[4:].tolist() == pytest.approx([-1, -1, 1, 1], abs=1e-3)
    assert stats["raw_group_std"] == pytest.approx((0.001118 + 0.5) / 2, rel=1e-3)


# ------------------------------------------------------------------------------------------ PRDP
def test_prdp_loss_by_hand_sign_zero_point_and_clip():
    eps = 0.01
    lr = torch.tensor([[0.001, 0.003], [0.0, -0.002]], requires_grad=True)  # rows a, b; two steps
    # mean a = 0.002, mean b = -0.001: prediction 1000 x 0.003 = 3, target 1: loss (3 - 1)^2 = 4
    loss, st = prdp_loss(lr, torch.tensor([1.0]), torch.tensor([1.0]), 1000.0, eps)
    assert loss.item() == pytest.approx(4.0, rel=1e-5) and st["clipfrac"] == 0
    loss.backward()
    # d/d lr_a,t = 2 (3 - 1) x 1000 / 2 = 2000 (prediction too high: descending lowers a's log-ratio)
    assert lr.grad.view(-1).tolist() == pytest.approx([2000.0, 2000.0, -2000.0, -2000.0], rel=1e-5)
    # zero point: a prediction equal to the target has zero loss and zero gradient
    lr0 = torch.tensor([[0.001, 0.001], [0.0, 0.0]], requires_grad=True)
    loss0, _ = prdp_loss(lr0, torch.tensor([1.0]), torch.tensor([1.0]), 1000.0, eps)
    loss0.backward()
    assert loss0.item() == pytest.approx(0.0, abs=1e-9) and lr0.grad.abs().max() < 1e-4
    # proximal clip: a ratio beyond 1 + eps counts as log(1 + eps) and carries no gradient
    lr1 = torch.tensor([[0.5, 0.0], [0.0, 0.0]], requires_grad=True)
    loss1, st1 = prdp_loss(lr1, torch.tensor([0.0]), torch.tensor([1.0]), 10.0, eps)
    assert loss1.item() == pytest.approx((10 * math.log(1 + eps) / 2) ** 2, rel=1e-5)
    loss1.backward()
    assert lr1.grad[0, 0] == 0 and lr1.grad[0, 1] != 0 and st1["clipfrac"] == pytest.approx(0.25)
    # a weight-0 (padding) pair adds nothing
    lr2 = torch.cat([lr.detach(), torch.tensor([[5.0, 5.0], [-5.0, -5.0]])])
    loss2, _ = prdp_loss(lr2, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), 1000.0, 10.0 / 11)
    assert loss2.item() == pytest.approx(4.0, rel=1e-5)


def test_prdp_pairs_stay_within_groups_and_leftovers_get_weight_zero():
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    rows, w = make_pairs(groups, torch.arange(7), "adjacent", random.Random(0))
    pairs = [rows[i:i + 2] for i in range(0, len(rows), 2)]
    real = [p for p, x in zip(pairs, w) if x == 1]
    assert len(real) == 2 and all(groups[a] == groups[b] for a, b in real)
    # every sample once, and the last leftover twice (paired with itself)
    assert sorted(i for p in pairs for i in p) == sorted(list(range(7)) + [pairs[-1][0]])
    assert w.count(0.0) == 2  # three leftovers (one per group): one cross-group pair and one self-pair
    rows_all, w_all = make_pairs(groups, torch.arange(7), "all", random.Random(0))
    assert len(w_all) == 3 + 3 and all(x == 1 for x in w_all)


# ------------------------------------------------------------------------------------------ DRAGON
def test_dragon_sets_and_losses_by_hand():
    adv = torch.tensor([0.3, -1.0, 2.0, 0.1, 5.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pos, neg = contrast_sets(adv, groups, 0.25)  # group 1 all equal: no sets
    assert pos == [2] and neg == [1]
    pos, neg = contrast_sets(adv, groups, 0.5)
    assert pos == [2, 0] and neg == [1, 3]  # best with worst, second best with second worst
    d_pos, d_neg = torch.tensor([0.001], requires_grad=True), torch.tensor([0.003], requires_grad=True)
    loss, st = dpo_loss(d_pos, d_neg, 500.0, torch.ones(1))
    # logits = -500 (0.001 - 0.003) = 1: loss = -log sigmoid(1)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))), rel=1e-5) and st["dpo_acc"] == 1
    loss.backward()
    assert d_pos.grad.item() > 0 > d_neg.grad.item()  # lower the positive's error, raise the negative's
    # zero point of DPO: equal errors give log 2
    assert dpo_loss(torch.zeros(1), torch.zeros(1), 500.0, torch.ones(1))[0].item() == pytest.approx(math.log(2))
    d = torch.tensor([-0.002, 0.002], requires_grad=True)
    kl, _ = kto_loss(d, torch.tensor([1.0, -1.0]), 500.0, torch.ones(2))
    # u = [1, -1], z = max(0, mean u) = 0: losses 1 - sigmoid(1) and 1 - sigmoid(1)
    assert kl.item() == pytest.approx(1 - 1 / (1 + math.exp(-1)), rel=1e-5)
    kl.backward()
    assert d.grad[0] > 0 and d.grad[1] < 0


# ------------------------------------------------------------------------------------------ distributional rewards
def test_frechet_distance_and_vendi_against_their_formulas():
    from flowalign.rewards.exemplar import frechet_distance, leave_one_out, vendi_score

    # diagonal Gaussians: sum over dims of (m1 - m2)^2 + s1^2 + s2^2 - 2 s1 s2
    fd = frechet_distance(torch.tensor([0.0, 1.0]), torch.diag(torch.tensor([4.0, 1.0])),
                          torch.tensor([1.0, 1.0]), torch.diag(torch.tensor([1.0, 9.0])))
    assert fd == pytest.approx((1 + 4 + 1 - 2 * 2) + (0 + 1 + 9 - 2 * 3))
    assert vendi_score(torch.ones(5, 3)) == pytest.approx(1.0)
    assert vendi_score(torch.eye(4)) == pytest.approx(4.0)
    # three copies of one image and one different: the odd one out adds the most diversity
    e = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0]])
    r = leave_one_out(e, vendi_score, 1.0)
    assert r[3] > r[0] == r[1] == r[2] and r[0] == pytest.approx(vendi_score(e) - vendi_score(e[1:]))


def _renders(metas, seed=0):
    from flowalign.rewards.exemplar import _renders as r
    return r(metas, seed)


def test_exemplar_and_frechet_rewards_prefer_renders_of_the_prompt():
    from flowalign.rewards import build_reward
    from flowalign.shapeworld.world import random_metadata

    rng = random.Random(3)
    metas = [random_metadata("colors", rng) for _ in range(6)]
    metas = [m for i, m in enumerate(metas) if m["prompt"] not in [x["prompt"] for x in metas[:i]]][:3]
    assert len(metas) == 3
    ex = build_reward("exemplar", n_exemplars=8)
    own = _renders(metas, seed=11)
    shifted = metas[1:] + metas[:1]  # each image scored against another prompt's exemplars
    right = ex(own, [m["prompt"] for m in metas], metas)["reward"]
    wrong = ex(own, [m["prompt"] for m in shifted], shifted)["reward"]
    assert (right > wrong).all()
    fr = build_reward("frechet", n_exemplars=64)
    clean = _renders([random_metadata("two_object", rng) for _ in range(12)], seed=5)
    noise = torch.rand(12, 3, *clean.shape[-2:])
    fd_clean = fr(clean, [""] * 12)["fd"][0].item()
    fd_noise = fr(noise, [""] * 12)["fd"][0].item()
    assert fd_clean < fd_noise
    mixed = torch.cat([noise[:11], clean[:1]])
    r = fr(mixed, [""] * 12)["reward"]
    assert r[-1] > r[:-1].max()  # the one render pulls the batch toward the exemplars most


# ------------------------------------------------------------------------------------------ through the trainer
@pytest.mark.parametrize("algo", [{"name": "pref_grpo"}, {"name": "prdp", "clip_range": 0.01, "beta": 100.0},
                                  {"name": "dragon"}, {"name": "dragon", "loss": "kto"}])
def test_new_algorithms_train_through_the_trainer(tiny_sd3, tmp_path, algo):
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", algorithm=algo,
                         sample={"num_steps": 4, "prompts_per_iter": 2, "group_size": 4, "batch_size": 8},
                         train={"iterations": 2, "lr": 1e-2, "batch_size": 4, "updates_per_iter": 2}))
    before = {k: v.detach().clone() for k, v in t.trainable_state().items()}
    t.run()
    after = t.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [1, 2]
    key = {"pref_grpo": "win_rate_std", "prdp": "prdp_mse", "dragon": "fm_err"}[algo["name"]]
    assert all(key in r for r in recs)
    if algo["name"] == "prdp":  # before the first update the stored log-probs are the policy's own
        assert recs[0]["onpolicy_ratio_dev"] < 1e-4


@pytest.mark.parametrize("name", ["pref_grpo", "prdp", "dragon", "dragon_exemplar", "hack_shapeclip_pref", "g2rpo"])
def test_shipped_configs_run_two_iterations(tmp_path, name):
    over = ["train.iterations=2", "sample.prompts_per_iter=2", "sample.group_size=4", "sample.batch_size=8",
            "train.batch_size=8", "train.updates_per_iter=1", "sample.num_steps=4", "eval.num_steps=2",
            "eval.n_per_task=1", "eval.guidance=2.0", f"run.output_dir={tmp_path / 'run'}", "run.checkpoint_every=0"]
    cfg = load_config(str(ROOT / "configs" / f"shapeworld_{name}.yaml"), over)
    res = Trainer(cfg).run()
    assert res["iterations"] == 2 and (tmp_path / "run" / "final").is_dir()


PLUGIN_GROUPS = """
import json, os
import torch
from flowalign.rewards import Reward


class GroupSizes(Reward):
    name = "group_sizes"
    group_scope = True

    def score(self, images, prompts, metadata):
        return {"reward": images.mean(dim=(1, 2, 3))}

    def finalize(self, outputs, groups):
        sizes = {int(g): int((groups == g).sum()) for g in groups.unique()}
        with open(os.environ["GROUP_LOG"] + "." + os.environ.get("RANK", "0"), "a") as f:
            f.write(json.dumps({"n": len(groups), "sizes": sizes}) + "\\n")
        return outputs
"""


@pytest.mark.slow
def test_a_group_scope_reward_sees_whole_groups_across_two_processes(tiny_sd3, tmp_path, monkeypatch):
    """2 gloo ranks hold 4 samples each of 2 groups of 4, shuffled across ranks: finalize sees all 8 samples and
    both groups whole, on each rank."""
    d = tiny_cfg(tiny_sd3, tmp_path / "run", algorithm={"name": "pref_grpo"},
                 sample={"num_steps": 2, "prompts_per_iter": 2, "group_size": 4, "batch_size": 8},
                 train={"iterations": 2, "lr": 1e-2, "batch_size": 4, "updates_per_iter": 1}).to_dict()
    d["rewards"] = {"plug_groups:GroupSizes": 1.0}
    (tmp_path / "plug_groups.py").write_text(PLUGIN_GROUPS)
    monkeypatch.setenv("GROUP_LOG", str(tmp_path / "groups.log"))
    r = _launch(tmp_path, d, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        recs = [json.loads(x) for x in (tmp_path / f"groups.log.{rank}").read_text().splitlines()]
        assert len(recs) == 2 and all(x["n"] == 8 and sorted(x["sizes"].values()) == [4, 4] for x in recs)
    per = json.loads((tmp_path / "run" / "config.json").read_text())
    assert per["world_size"] == 2


# ------------------------------------------------------------------------------------------ pairwise judges
class Cyclic:
    """Rock-paper-scissors on an image's mean brightness class (0, 1, 2): no pointwise score reproduces it."""

    @staticmethod
    def cls(x):
        return (x.mean(dim=(1, 2, 3)) * 3).floor().clamp(0, 2).long()


def _cyclic_judge():
    from flowalign.rewards import PairwiseJudge

    class RPS(PairwiseJudge):
        name = "rps"

        def prefer(self, a, b, prompts, metadata):
            ca, cb = Cyclic.cls(a), Cyclic.cls(b)
            return torch.where(ca == cb, 0.5, torch.where((ca - cb) % 3 == 1, 1.0, 0.0))

    return RPS()


def test_a_pairwise_judge_is_used_pairwise_and_finished_on_gathered_groups():
    judge = _cyclic_judge()
    imgs = torch.stack([torch.full((3, 4, 4), v) for v in (0.1, 0.5, 0.9)])  # classes 0, 1, 2
    # 1 beats 0, 2 beats 1, 0 beats 2: every image wins once of two
    r = judge(imgs, ["p"] * 3)["reward"]
    assert r.tolist() == pytest.approx([0.5, 0.5, 0.5])
    # a transitive order from a pointwise scorer would give ranks instead
    from flowalign.rewards import BradleyTerryJudge
    from test_trainer import Brightness

    bt = BradleyTerryJudge(Brightness(), temperature=0.1, hard=False)
    soft = bt(imgs[:2], ["p"] * 2)["reward"]
    p = 1 / (1 + math.exp(-(0.1 - 0.5) / 0.1))
    assert soft.tolist() == pytest.approx([p, 1 - p], rel=1e-5)
    # finalize: the groups are ids over the gathered batch, not prompts (two groups share a prompt)
    imgs6 = torch.cat([imgs, imgs[[0, 1, 1]]])
    out = judge.finalize({"reward": torch.zeros(6)}, torch.tensor([0, 0, 0, 1, 1, 1]), images=imgs6,
                         prompts=["p"] * 6, metadata=None)
    assert out["reward"].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0, 0.75, 0.75])


def test_the_trainer_hands_a_pairwise_judge_the_whole_groups_images(tiny_sd3, tmp_path):
    from flowalign.rewards import BradleyTerryJudge
    from test_trainer import Brightness

    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", sample={"num_steps": 2, "prompts_per_iter": 3, "group_size": 4,
                                                              "batch_size": 5},
                         train={"batch_size": 12, "updates_per_iter": 1}))
    t.reward = BradleyTerryJudge(Brightness(), temperature=1.0)  # hard wins: the rank by brightness
    traj, rew, groups = t.collect(0)
    done = t.group_rewards(rew, groups, traj)["reward"]
    bright = traj.images.mean(dim=(1, 2, 3))
    for g in groups.unique():
        m = (groups == g).cpu()
        ranks = bright[m].argsort().argsort().float() / 3
        assert done[m].tolist() == pytest.approx(ranks.tolist())


# ------------------------------------------------------------------------------------------ G2RPO
def test_g2rpo_completions_and_multi_granularity_advantages(tiny_sd3, tmp_path):
    from flowalign.algorithms.grpo import GRPO
    from flowalign.rollout import complete

    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", algorithm={"name": "grpo", "granularities": [2]},
                         sample={"num_steps": 6, "prompts_per_iter": 2, "group_size": 4, "batch_size": 8,
                                 "branching": True, "shared_noise": True, "sde_steps": "first:2"},
                         train={"iterations": 2, "lr": 1e-2, "batch_size": 8, "updates_per_iter": 1}))
    traj, rew, groups = t.collect(0)
    assert "reward@2" in rew and not torch.allclose(rew["reward@2"], rew["reward"])
    # every = 1 repeats the stored ODE tail: the stored images come back
    assert torch.allclose(complete(t.adapter, traj, 1), traj.images, atol=1e-5)
    # every = 2 by hand for one sample: from x_{k+1} over sigmas k+1, k+3, ..., T
    k = int(traj.sde_mask[0].nonzero().max())
    idx = list(range(k + 1, 7, 2)) + ([6] if (6 - k - 1) % 2 else [])
    sig, x = traj.sigmas[idx], traj.latents[:1, k + 1]
    for i in range(len(idx) - 1):
        x = t.adapter.step(x, sig, i, traj.cond.index(torch.tensor([0])), traj.guidance, 0.0).next
    assert torch.allclose(complete(t.adapter, traj, 2)[0], t.adapter.decode(x)[0], atol=1e-5)
    # integration: the mean of each granularity's group-normalised advantages
    r = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    g = torch.tensor([0, 0, 0, 0])
    adv = GRPO.advantages(t.algo, r, g)
    want = (group_advantages(r[:, 0], g, adv_clip=None) + group_advantages(r[:, 1], g, adv_clip=None)) / 2
    assert torch.allclose(adv, want) and adv[1] > 0.9 and adv[2] < -0.9 and adv[0].abs() < 1e-6
    t.run()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("score/reward@2" in x for x in recs)


def test_g2rpo_refuses_a_group_scope_reward(tiny_sd3, tmp_path):
    from flowalign.config import ConfigError

    d = tiny_cfg(tiny_sd3, tmp_path / "run", algorithm={"name": "grpo", "granularities": [2]}).to_dict()
    d["rewards"] = {"test_brightness": {"pairwise": True}}
    with pytest.raises(ConfigError, match="group-scope reward"):
        Trainer(load_config(d))
