"""GRPO advantages and the clipped loss on hand-made numbers."""
import math

import pytest
import torch

from flowalign.algorithms import clipped_policy_loss, group_advantages
from flowalign.algorithms.grpo import grpo_step_loss


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0, 3.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(r, g, eps=0.0, adv_clip=None)
    std0 = math.sqrt(2 / 3)
    assert adv[:3].tolist() == pytest.approx([-1 / std0, 0.0, 1 / std0], rel=1e-5)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # zero-std group: no signal, no NaN


def test_group_advantages_global_std_and_clip():
    r = torch.tensor([0.0, 10.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(r, g, global_std=True, eps=0.0, adv_clip=None)
    gstd = r.std(unbiased=False).item()
    assert adv.tolist() == pytest.approx([-5 / gstd, 5 / gstd, 0, 0], rel=1e-5)
    clipped = group_advantages(torch.tensor([0.0] * 99 + [1.0]), torch.zeros(100, dtype=torch.long), adv_clip=5.0)
    assert clipped.max().item() == 5.0


def _grad_of_loss(ratio_value, adv_value, eps=0.1):
    lp = torch.tensor([math.log(ratio_value)], requires_grad=True)
    loss, stats = clipped_policy_loss(lp, torch.zeros(1), torch.tensor([adv_value]), eps)
    loss.backward()
    return lp.grad.item(), loss.item(), stats


@pytest.mark.parametrize("ratio,adv,clipped", [
    (1.5, 1.0, True),    # positive advantage, ratio already above 1+eps: no further push
    (0.5, 1.0, False),   # positive advantage, ratio below 1-eps: still pushed up
    (0.5, -1.0, True),   # negative advantage, ratio below 1-eps: no further push
    (1.5, -1.0, False),  # negative advantage, ratio above 1+eps: pushed down
])
def test_clipping_behaviour(ratio, adv, clipped):
    grad, loss, stats = _grad_of_loss(ratio, adv)
    if clipped:
        assert grad == 0.0
        assert loss == pytest.approx(-adv * (1 + 0.1 if ratio > 1 else 1 - 0.1))
    else:
        # d/dlogp of -A * exp(logp) = -A * ratio: descent raises log p for A > 0, lowers it for A < 0
        assert grad == pytest.approx(-adv * ratio)
    assert stats["clipfrac"] == 1.0


def test_gradient_sign_inside_trust_region():
    grad, loss, stats = _grad_of_loss(1.0, 2.0)
    assert grad == pytest.approx(-2.0) and loss == pytest.approx(-2.0)
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0


def test_kl_term_has_a_gradient():
    mean = torch.tensor([[1.0, 2.0]], requires_grad=True)
    from flowalign.samplers import gaussian_kl
    kl = gaussian_kl(mean, torch.tensor([[0.0, 2.0]]), torch.tensor(1.0))
    loss, stats = grpo_step_loss(torch.zeros(1, requires_grad=True), torch.zeros(1), torch.zeros(1), 1e-4, 0.5, kl)
    loss.backward()
    assert stats["kl"] == pytest.approx(0.25)
    assert mean.grad.tolist() == [[pytest.approx(0.5 * 1.0 / 2), 0.0]]  # beta * d/dmu (mu^2 / 2 / 2 elements)
