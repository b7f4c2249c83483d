"""The sampler math against formulas written out by hand."""
import math

import pytest
import torch

from flowalign import samplers


def test_flow_sde_mean_std_by_hand():
    x, v = torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([[2.0, 0.25]], dtype=torch.float64)
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    out = samplers.flow_sde_step(x, v, sigma, sigma_next, a, noise=torch.zeros_like(x))
    s_t = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    for k in range(2):
        xk, vk = x[0, k].item(), v[0, k].item()
        mean = xk + (vk + s_t ** 2 / (2 * sigma) * (xk + (1 - sigma) * vk)) * dt
        assert out.mean[0, k].item() == pytest.approx(mean, rel=1e-6)
    assert out.std.item() == pytest.approx(s_t * math.sqrt(-dt), rel=1e-6)
    assert torch.equal(out.next, out.mean)  # zero noise


def test_sigma_one_uses_cap():
    out = samplers.flow_sde_step(torch.zeros(1, 1), torch.zeros(1, 1), 1.0, 0.9, 0.7, sigma_cap=0.9,
                                 noise=torch.zeros(1, 1))
    assert out.std.item() == pytest.approx(0.7 * math.sqrt(1 / (1 - 0.9)) * math.sqrt(0.1), rel=1e-6)
    assert torch.isfinite(out.log_prob).all()


def test_log_prob_is_gaussian_density_mean_over_elements():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sig = torch.tensor([0.9, 0.5, 0.3])
    out = samplers.flow_sde_step(x, v, sig, sig - 0.1, 0.7, noise=torch.randn(3, 4, 2, 2, generator=g))
    ref = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.next).mean(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, ref, atol=1e-5)
    summed = samplers.flow_sde_step(x, v, sig, sig - 0.1, 0.7, next_x=out.next, reduce="sum").log_prob
    assert torch.allclose(summed, ref * 16, atol=1e-4)


def test_scoring_a_given_transition_matches_sampling_it():
    g = torch.Generator().manual_seed(1)
    x, v, n = (torch.randn(2, 3, generator=g) for _ in range(3))
    s = samplers.flow_sde_step(x, v, 0.7, 0.6, 0.7, noise=n)
    r = samplers.flow_sde_step(x, v, 0.7, 0.6, 0.7, next_x=s.next)
    assert torch.equal(s.log_prob, r.log_prob)


def test_zero_noise_level_is_the_euler_ode_step():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    sde = samplers.flow_sde_step(x, v, 0.8, 0.7, 0.0, noise=torch.randn(2, 5, generator=g))
    ode = samplers.ode_step(x, v, 0.8, 0.7)
    assert torch.allclose(sde.next, x + v * (0.7 - 0.8), atol=1e-7)
    assert torch.allclose(sde.mean, ode.next, atol=1e-7)


def _gaussian_velocity(x, sigma, m, s):
    """Exact rectified-flow velocity E[noise - x0 | x_sigma = x] for x0 ~ N(m, s^2)."""
    var = (1 - sigma) ** 2 * s ** 2 + sigma ** 2
    centred = x - (1 - sigma) * m
    e_x0 = m + (1 - sigma) * s ** 2 / var * centred
    e_eps = sigma / var * centred
    return e_eps - e_x0


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_sde_keeps_the_marginals_on_gaussian_data(noise_level):
    """Sampling N(0,1) -> data with the exact velocity must give N(m, s^2) at the end and the interpolant's
    marginal N((1-sigma) m, (1-sigma)^2 s^2 + sigma^2) at every intermediate sigma, with or without noise."""
    m, s, n, steps = 1.5, 0.5, 200_000, 400
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    sig = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        v = _gaussian_velocity(x, sig[i], m, s)
        x = samplers.flow_sde_step(x, v, sig[i], sig[i + 1], noise_level, sigma_cap=float(sig[1]),
                                   noise=torch.randn(n, generator=g, dtype=torch.float64)).next
        if i + 1 == steps // 2:
            sm = float(sig[i + 1])
            assert x.mean().item() == pytest.approx((1 - sm) * m, abs=0.02)
            assert x.std().item() == pytest.approx(math.sqrt((1 - sm) ** 2 * s ** 2 + sm ** 2), abs=0.02)
    assert x.mean().item() == pytest.approx(m, abs=0.02)
    assert x.std().item() == pytest.approx(s, abs=0.02)


def test_block_noise_keeps_the_marginals_and_adds_no_correlation():
    """Noise only in 2x2 block means (noise_block=2): pixels of N(m, s^2) data must keep their marginals, and two
    pixels of a block, independent in the data, must stay uncorrelated (an unprojected score term would not)."""
    m, s, n, steps = 1.5, 0.5, 100_000, 200
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    sig = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        v = _gaussian_velocity(x, sig[i], m, s)
        x = samplers.flow_sde_step(x, v, sig[i], sig[i + 1], 1.0, sigma_cap=float(sig[1]), noise_block=2,
                                   noise=torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)).next
    px = x.view(n, 4)
    assert px.mean(0).tolist() == pytest.approx([m] * 4, abs=0.02)
    assert px.std(0).tolist() == pytest.approx([s] * 4, abs=0.02)
    assert torch.corrcoef(px.T)[0, 1].item() == pytest.approx(0.0, abs=0.02)


def test_block_noise_log_prob_by_hand():
    """With noise_block=2 the step moves only the block mean; its log-prob is the density of z = 2 * blockmean / std
    (one coordinate per 2x2 block)."""
    x, v = torch.zeros(1, 1, 2, 2, dtype=torch.float64), torch.ones(1, 1, 2, 2, dtype=torch.float64)
    noise = torch.tensor([[[[1.0, 3.0], [-1.0, 1.0]]]], dtype=torch.float64)  # block mean 1.0
    out = samplers.flow_sde_step(x, v, 0.6, 0.5, 0.7, noise=noise, noise_block=2)
    std = out.std.item()
    assert torch.allclose(out.next - out.mean, torch.full_like(x, std * 1.0))  # every pixel moved by the mean
    z = 2 * 1.0 * std / std
    assert out.log_prob.item() == pytest.approx(-z ** 2 / 2 - math.log(std) - 0.5 * math.log(2 * math.pi), rel=1e-9)
    rescored = samplers.flow_sde_step(x, v, 0.6, 0.5, 0.7, next_x=out.next, noise_block=2)
    assert rescored.log_prob.item() == pytest.approx(out.log_prob.item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"noise_block 3 does not divide the latent size \(2, 2\)"):
        samplers.flow_sde_step(x, v, 0.6, 0.5, 0.7, noise=noise, noise_block=3)


def test_gaussian_kl_formula_and_zero():
    mp, mq = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.5]])
    std = torch.tensor(0.5)
    kl = samplers.gaussian_kl(mp, mq, std)
    assert kl.item() == pytest.approx(((1.0 ** 2 + 0.5 ** 2) / (2 * 0.25)) / 2, rel=1e-6)
    assert samplers.gaussian_kl(mp, mp, std).item() == 0.0
    # equals the closed-form KL of torch.distributions
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mp, std), torch.distributions.Normal(mq, std))
    assert kl.item() == pytest.approx(ref.mean().item(), rel=1e-6)


def test_cps_step_by_hand():
    x, v = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[-0.5]], dtype=torch.float64)
    s, s1, a = 0.6, 0.4, 0.8
    out = samplers.cps_step(x, v, s, s1, a, noise=torch.zeros_like(x))
    std = s1 * math.sin(a * math.pi / 2)
    x0, x1 = 1.0 - s * -0.5, 1.0 + (1 - s) * -0.5
    assert out.std.item() == pytest.approx(std, rel=1e-6)
    assert out.mean.item() == pytest.approx((1 - s1) * x0 + math.sqrt(s1 ** 2 - std ** 2) * x1, rel=1e-6)


def test_ddim_step_by_hand():
    x, eps = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[0.1]], dtype=torch.float64)
    a, ap, eta = 0.5, 0.8, 1.0
    out = samplers.ddim_step(x, eps, a, ap, eta, noise=torch.zeros_like(x))
    x0 = (0.3 - math.sqrt(1 - a) * 0.1) / math.sqrt(a)
    std = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
    assert out.std.item() == pytest.approx(std, rel=1e-6)
    assert out.mean.item() == pytest.approx(math.sqrt(ap) * x0 + math.sqrt(1 - ap - std ** 2) * 0.1, rel=1e-6)
    det = samplers.ddim_step(x, eps, a, ap, 0.0)
    assert det.log_prob is None
    assert det.next.item() == pytest.approx(math.sqrt(ap) * x0 + math.sqrt(1 - ap) * 0.1, rel=1e-6)


def test_step_std_of_each_kernel_by_hand():
    from flowalign.samplers import step_std

    sig = torch.tensor([1.0, 0.75, 0.5, 0.0])
    # sde: a sqrt(sigma / (1 - sigma)) sqrt(sigma_i - sigma_{i+1}), sigma = 1 capped at sigmas[1] = 0.75
    assert step_std(sig, 0, 0.7) == pytest.approx(0.7 * math.sqrt(1 / 0.25) * math.sqrt(0.25))
    assert step_std(sig, 1, 0.7) == pytest.approx(0.7 * math.sqrt(0.75 / 0.25) * math.sqrt(0.25))
    # cps: sigma_{i+1} sin(a pi / 2)
    assert step_std(sig, 1, 0.5, "cps") == pytest.approx(0.5 * math.sin(0.25 * math.pi))
