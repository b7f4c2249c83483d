"""Forward-process algorithms (DiffusionNFT, AWM) on hand-made numbers, the adapter's named policies, and short
training runs of every algorithm through the one trainer."""
import json

import pytest
import torch

from flowalign.algorithms import ALGORITHMS
from flowalign.algorithms.awm import matching_loss
from flowalign.algorithms.forward import noised, sample_times
from flowalign.algorithms.grpo import clipped_policy_loss
from flowalign.algorithms.nft import balance_groups, nft_loss, optimality_weight
from flowalign.pipelines.sd3 import SD3Adapter
from flowalign.trainer import Trainer

from test_trainer import tiny_cfg  # noqa: E402  (tests/ is on sys.path under pytest)


def one(x):
    return torch.tensor([[x]], dtype=torch.float32)


# ------------------------------------------------------------------------------------------ DiffusionNFT
def test_optimality_weight_maps_clipped_advantages_to_unit_interval():
    r = optimality_weight(torch.tensor([-2.0, -1.0, 0.0, 0.5, 3.0]), adv_clip=1.0)
    assert r.tolist() == [0.0, 0.0, 0.5, 0.75, 1.0]
    assert optimality_weight(torch.tensor([1.0]), adv_clip=2.0).tolist() == [0.75]


def test_nft_loss_by_hand():
    # x0 = 0, t = 0.5, x_t = 1, v = 1, v_old = 0, beta = 1:
    # v+ = v = 1 -> e+ = 1 - 0.5 = 0.5, w+ = 0.5, L+ = 0.25 / 0.5 = 0.5
    # v- = 2 v_old - v = -1 -> e- = 1 + 0.5 = 1.5, w- = 1.5, L- = 2.25 / 1.5 = 1.5
    x0, xt, t = one(0.0), one(1.0), torch.tensor([0.5])
    for r, want in ((1.0, 0.5), (0.0, 1.5), (0.5, 1.0)):
        v = one(1.0).requires_grad_()
        loss, st = nft_loss(v, one(0.0), xt, x0, t, torch.tensor([r]), beta=1.0)
        assert loss.item() == pytest.approx(want) and st["nft_pos"] == pytest.approx(0.5)
        loss.backward()
        # dL+/dv = 2 e+ (-t) / w+ = -1 ; dL-/dv = 2 e- (+t) / w- = +1
        assert v.grad.item() == pytest.approx(r * -1.0 + (1 - r) * 1.0)
    # beta scales the implicit policies: beta = 0.5, v = 1, v_old = 0 -> v+ = 0.5, e+ = 0.75, L+ = 0.75, / beta
    loss, _ = nft_loss(one(1.0), one(0.0), xt, x0, t, torch.tensor([1.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.75 / 0.5)
    # without the adaptive weight (w = 1): L+ = e+^2 = 0.25, L- = e-^2 = 2.25; dL/dv = 2 e (-+t) = -0.5 / +1.5
    for r, want, g in ((1.0, 0.25, -0.5), (0.0, 2.25, 1.5)):
        v = one(1.0).requires_grad_()
        loss, _ = nft_loss(v, one(0.0), xt, x0, t, torch.tensor([r]), beta=1.0, adaptive=False)
        loss.backward()
        assert loss.item() == pytest.approx(want) and v.grad.item() == pytest.approx(g)
    # negatives off: weight 2r - 1 on L+ only: r = 1 -> L+ = 0.5 (grad -1), r = 0.75 -> 0.25 (grad -0.5), r <= 1/2 -> 0
    for r, want, g in ((1.0, 0.5, -1.0), (0.75, 0.25, -0.5), (0.5, 0.0, 0.0), (0.0, 0.0, 0.0)):
        v = one(1.0).requires_grad_()
        loss, _ = nft_loss(v, one(0.0), xt, x0, t, torch.tensor([r]), beta=1.0, negatives=False)
        loss.backward()
        assert loss.item() == pytest.approx(want) and v.grad.item() == pytest.approx(g)


def test_nft_balance_by_hand():
    from flowalign.algorithms.grpo import group_advantages

    # group 0: binary rewards 1, 0, 0, 0: mean 1/4, std sqrt(3)/4 -> A = +sqrt(3), three -1/sqrt(3); clipped at 1:
    # +1 and three -0.577, sum 1 - sqrt(3) = -0.732; the negatives are scaled by 1 / sqrt(3) -> -1/3 each.
    # group 1: 1, 1, 1, 0 (the mirror image): +1/3 three times and -1. group 2: 1, 0 (balanced): left as +-1.
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0, 1, 0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    adv = group_advantages(rewards, groups, eps=0.0, adv_clip=1.0)
    out, gsum = balance_groups(adv, groups)
    s3 = 3 ** 0.5
    assert out.tolist() == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, 1 / 3, -1, 1, -1])
    assert gsum.tolist() == pytest.approx([1 - s3] * 4 + [s3 - 1] * 4 + [0, 0])
    # an all-equal group (no signal) stays zero
    out, gsum = balance_groups(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    assert out.tolist() == [0, 0, 0] and gsum.tolist() == [0, 0, 0]
    # what the trainer gets from the algorithm: the balanced advantages only with algorithm.balance on, and the
    # group sums before balancing logged either way (mean over samples: (4 (1 - s3) + 4 (s3 - 1) + 0) / 10 = 0)
    from flowalign.algorithms.base import Context

    ctx = Context(sample=None, sigmas=torch.linspace(1, 0, 3), sde_mask=torch.zeros(2, dtype=torch.bool), world=1,
                  seed=0)
    for balance, want in ((False, adv), (True, out_on := balance_groups(adv, groups)[0])):
        nft = ALGORITHMS["nft"](ALGORITHMS["nft"].Config(balance=balance), ctx)
        got, stats = nft.advantages_and_stats(rewards, groups)
        assert torch.allclose(got, want, atol=1e-3)  # the trainer's advantages use eps = 1e-4 in the std
        assert stats["adv_group_sum"] == pytest.approx(0.0, abs=1e-6)
        assert stats["adv_group_sum_abs"] == pytest.approx(0.8 * (s3 - 1), abs=1e-3)
    assert not torch.allclose(adv, out_on)


def test_nft_gradient_is_zero_at_the_old_policy_for_a_neutral_sample_and_signed_otherwise():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0.2, 0.5, 0.8])
    xt = noised(x0, t, eps)
    v_old = torch.randn(3, 4, 2, 2, generator=g)

    def grad(r):
        v = v_old.clone().requires_grad_()
        nft_loss(v, v_old, xt, x0, t, r, beta=1.0)[0].backward()
        return v.grad

    assert grad(torch.full((3,), 0.5)).abs().max() < 1e-7  # r = 1/2 at v = v_old: the two terms cancel
    # r = 1 moves v towards the clean sample's velocity target (x_t - x0) / t, r = 0 away from it
    target = (xt - x0) / t.view(-1, 1, 1, 1)
    step_pos, step_neg = -grad(torch.ones(3)), -grad(torch.zeros(3))
    assert ((step_pos * (target - v_old)).sum((1, 2, 3)) > 0).all()
    assert ((step_neg * (target - v_old)).sum((1, 2, 3)) < 0).all()


def test_forward_noising_and_time_sampling():
    x0, eps = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    assert noised(x0, torch.tensor([0.25, 1.0]), eps).view(-1).tolist() == [0.25, 1.0]
    t = sample_times(4000, 2, torch.Generator().manual_seed(0), "logit_normal", (0.2, 0.6))
    assert t.shape == (4000, 2) and t.min() > 0.2 and t.max() < 0.6
    assert t.mean().item() == pytest.approx(0.4, abs=0.01)  # symmetric around the middle of the range
    u = sample_times(4000, 1, torch.Generator().manual_seed(0), "uniform")
    assert u.std().item() == pytest.approx((1 / 12) ** 0.5, abs=0.01)


# ------------------------------------------------------------------------------------------ AWM
def test_awm_matching_loss_and_its_clipped_ratio():
    x0, eps, v = one(0.0).view(1, 1, 1, 1), one(1.0).view(1, 1, 1, 1), one(3.0).view(1, 1, 1, 1)
    t = torch.tensor([0.5])
    assert matching_loss(v, x0, eps, t).item() == pytest.approx(4.0)       # (3 - (1 - 0))^2
    assert matching_loss(v, x0, eps, t, "t").item() == pytest.approx(2.0)
    assert matching_loss(v, x0, eps, t, "t2").item() == pytest.approx(1.0)
    # pseudo log-prob -l: l_new 0.5 < l_old 1 makes the ratio e^0.5; with A > 0 it is clipped (no gradient),
    # with A < 0 the unclipped branch is the max and pushes l_new back up
    for adv, has_grad in ((1.0, False), (-1.0, True)):
        l_new = torch.tensor([0.5], requires_grad=True)
        loss, st = clipped_policy_loss(-l_new, -torch.tensor([1.0]), torch.tensor([adv]), 1e-5)
        loss.backward()
        assert (l_new.grad.abs().item() > 0) == has_grad and st["clipfrac"] == 1.0
        if has_grad:
            # d(-A ratio)/d l_new = A ratio (ratio = exp(l_old - l_new)): negative, so descent raises l_new
            assert l_new.grad.item() == pytest.approx(adv * torch.tensor(0.5).exp().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ named policies
@pytest.mark.parametrize("lora", [False, True])
def test_named_policies_snapshot_lerp_and_predict(tiny_sd3, lora):
    ad = SD3Adapter.from_pretrained(tiny_sd3)
    params = ad.add_lora(rank=4, alpha=8, init=True) if lora else ad.full_finetune()
    cond = ad.encode(["a photo of a red circle"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in params:  # LoRA B starts at zero: move every trainable tensor
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    v0 = ad.predict(x, 0.5, cond).detach()
    start = [p.detach().clone() for p in params]
    ad.add_policy("old")
    ad.add_policy("reference")
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    v1 = ad.predict(x, 0.5, cond).detach()
    assert not torch.allclose(v0, v1, atol=1e-5)
    with torch.no_grad(), ad.policy("old"):
        assert torch.allclose(ad.predict(x, 0.5, cond), v0, atol=1e-6)
    assert torch.equal(ad.predict(x, 0.5, cond).detach(), v1)  # the trained weights are back after the context
    ad.lerp_policy("old", 0.25)
    old = ad.policy_tensors("old")
    assert all(torch.allclose(o, s + 0.25 * 0.1, atol=1e-6) for o, s in zip(old, start))
    ad.snapshot_policy("old")
    with torch.no_grad(), ad.policy("old"):
        assert torch.allclose(ad.predict(x, 0.5, cond), v1, atol=1e-6)
    with torch.no_grad(), ad.reference():  # the reference is not moved by lerp / snapshot of "old"
        ref = ad.predict(x, 0.5, cond)
    if lora:  # a LoRA run's reference is the base model (adapters disabled), not the perturbed start
        ad.transformer.disable_adapters()
        assert torch.equal(ref, ad.predict(x, 0.5, cond))
        ad.transformer.enable_adapters()
    else:
        assert torch.allclose(ref, v0, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"no policy 'ema'"):
        with ad.policy("ema"):
            pass


# ------------------------------------------------------------------------------------------ one trainer
@pytest.mark.parametrize("name", ["nft", "awm"])
def test_forward_process_algorithms_train_through_the_trainer(tiny_sd3, tmp_path, name):
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", algorithm={"name": name},
                         train={"iterations": 2, "lr": 1e-2, "batch_size": 4, "updates_per_iter": 2}))
    traj, rew, groups = t.collect(0)
    assert not traj.sde_mask.any() and (traj.log_probs == 0).all()  # ODE rollouts
    before = {k: v.detach().clone() for k, v in t.trainable_state().items()}
    t.run()
    after = t.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [1, 2] and all("policy_loss" in r for r in recs)
    if name == "nft":
        # end of iteration 0: decay min(0.001 x 0, 0.5) = 0, so the old policy was set to the trained weights;
        # end of iteration 1: old <- old + 0.999 (current - old)
        assert all("nft_pos" in r and "nft_neg" in r for r in recs)
    else:
        assert all("ema_kl" in r and "match_loss" in r for r in recs)
        # "old" is the snapshot taken at the end of the last iteration: the final weights
        old = t.adapter.policy_tensors("old")
        assert all(torch.equal(o, p) for o, p in zip(old, t.params))


def test_nft_old_policy_follows_by_the_decay_schedule(tiny_sd3, tmp_path):
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", algorithm={"name": "nft", "decay_rate": 0.25, "decay_max": 0.4},
                         train={"iterations": 1, "lr": 1e-2, "batch_size": 8, "updates_per_iter": 1}))
    old = t.adapter.policy_tensors("old")
    prev = [o.clone() for o in old]
    t.algo.end_iteration(t.adapter, 1)  # decay 0.25: old <- old + 0.75 (current - old)
    with torch.no_grad():
        for p in t.params:
            p.add_(1.0)
    t.algo.end_iteration(t.adapter, 5)  # decay min(1.25, 0.4) = 0.4
    for o, p0, p in zip(old, prev, t.params):
        want = p0 + 0.6 * (p - p0)  # the first lerp left old at p0: old = current = p0 then
        assert torch.allclose(o, want, atol=1e-6)


def test_every_algorithm_is_a_protocol_class_with_its_config():
    for name, cls in ALGORITHMS.items():
        assert cls.name == name and cls.Config().name == name and isinstance(cls.stochastic, bool)


def test_a_resumed_nft_run_keeps_its_old_policy(tiny_sd3, tmp_path):
    cfg = dict(algorithm={"name": "nft", "decay_rate": 0.3, "decay_max": 0.9},
               train={"iterations": 2, "lr": 1e-2, "batch_size": 8, "updates_per_iter": 1})
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", **cfg))
    t.run()
    old = [o.clone() for o in t.adapter.policy_tensors("old")]
    assert any(not torch.equal(o, p) for o, p in zip(old, t.params))  # decay 0.3 at iteration 1: old lags
    again = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", **cfg))
    assert again.iteration == 2
    assert all(torch.equal(a, b) for a, b in zip(again.adapter.policy_tensors("old"), old))
