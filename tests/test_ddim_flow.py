"""DDIM on flow latents (samplers.ddim_flow_step): the DDPM families' kernel, checked against the VP formulas."""
import math

import torch

from flowalign import samplers


def test_sigma_alpha_bar_roundtrip_and_ends():
    ab = torch.tensor([1e-4, 0.0047, 0.3, 0.5, 0.9, 0.99915], dtype=torch.float64)
    s = samplers.alpha_bar_to_sigma(ab)
    assert torch.allclose(samplers.sigma_to_alpha_bar(s), ab, rtol=1e-12)
    assert torch.all(s[1:] < s[:-1])                       # more signal, lower sigma
    assert abs(float(samplers.alpha_bar_to_sigma(torch.tensor(0.5))) - 0.5) < 1e-7
    assert float(samplers.alpha_bar_to_sigma(torch.tensor(1.0))) == 0.0


def _vp(ab):
    return math.sqrt(ab) + math.sqrt(1 - ab)


def test_ddim_flow_step_is_vp_ddim_in_flow_coordinates():
    g = torch.Generator().manual_seed(0)
    x0, eps, noise = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ab, abp = 0.2, 0.6
    s, sp = float(samplers.alpha_bar_to_sigma(torch.tensor(ab, dtype=torch.float64))), \
        float(samplers.alpha_bar_to_sigma(torch.tensor(abp, dtype=torch.float64)))
    x_vp = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    vp = samplers.ddim_step(x_vp, eps, ab, abp, 0.8, noise=noise, reduce="sum")
    fl = samplers.ddim_flow_step(x0, eps, s, sp, 0.8, noise=noise, reduce="sum")
    assert torch.allclose(fl.mean * _vp(abp), vp.mean, atol=1e-12)
    assert torch.allclose(fl.next * _vp(abp), vp.next, atol=1e-12)
    # the density of the same transition in flow coordinates: the VP one plus D log(c') (a constant per step)
    D = x0[0].numel()
    assert torch.allclose(fl.log_prob, vp.log_prob + D * math.log(_vp(abp)), atol=1e-8)
    # scoring the sample it drew gives the stored log-prob back exactly
    again = samplers.ddim_flow_step(x0, eps, s, sp, 0.8, next_x=fl.next, reduce="sum")
    assert torch.equal(again.log_prob, fl.log_prob)


def test_ddim_eta0_is_the_euler_step_of_the_flow_ode():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    s, sp = 0.8, 0.35
    x = (1 - s) * x0 + s * eps
    out = samplers.ddim_flow_step(x0, eps, s, sp, 0.0)
    euler = samplers.ode_step(x, eps - x0, s, sp)
    assert out.log_prob is None
    assert torch.allclose(out.next, euler.next, atol=1e-12)


def test_step_std_of_the_ddim_kernel():
    sig = torch.tensor([0.9, 0.5, 0.1])
    out = samplers.ddim_flow_step(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), sig[0], sig[1], 1.0)
    assert abs(samplers.step_std(sig, 0, 1.0, "ddim") - float(out.std)) < 1e-6
    assert samplers.step_std(sig, 0, 0.5, "ddim") == samplers.step_std(sig, 0, 1.0, "ddim") * 0.5
