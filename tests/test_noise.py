"""Inference-time alignment (``flowalign.noise``): the prior and its gradient by hand, per-sample clipping, ReNO
raising a differentiable reward on the tiny SD3 model, seeds reproducing and not depending on the batch, best-of-N's
first candidate being the evaluation's base sample, FK's potentials, weights, ESS and resampling on hand-made
numbers, the NFE of every method counted by the hook against the hand formula, CARINOX's reward selection and
category routing, and the CLI (outputs and one-line errors)."""
import json
import math

import numpy as np
import pytest
import torch

from flowalign import noise
from flowalign.noise import NoiseOptError, optimize

SHAPECLIP_PROMPTS = ["a photo of a red circle", "a photo of two squares"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shapeclip():
    from flowalign.rewards import build_reward

    return build_reward("shapeclip")


# ------------------------------------------------------------------------------------------------ the prior
def test_reno_prior_and_gradient_by_hand():
    z = torch.tensor([1.0, 2.0, 2.0, 4.0]).view(1, 1, 2, 2).requires_grad_(True)  # ||z||^2 = 25, d = 4
    p = noise.noise_prior(z, "reno")
    # 0.5 * 25 - (4 - 1) * log 5
    assert p.item() == pytest.approx(12.5 - 3 * math.log(5), abs=1e-5)
    p.sum().backward()
    # d/dz = z - (d - 1) z / ||z||^2 = z * (1 - 3 / 25)
    assert torch.allclose(z.grad, z.detach() * (1 - 3 / 25), atol=1e-6)


def test_chi2_prior_and_gradient_by_hand():
    z = torch.tensor([1.0, 2.0, 2.0, 4.0]).view(1, 1, 2, 2).requires_grad_(True)
    p = noise.noise_prior(z, "chi2")
    # 0.5 * 25 - (4 / 2 - 1) * log 25
    assert p.item() == pytest.approx(12.5 - math.log(25), abs=1e-5)
    p.sum().backward()
    # d/dz = z - (d / 2 - 1) * 2 z / ||z||^2 = z * (1 - 2 / 25)
    assert torch.allclose(z.grad, z.detach() * (1 - 2 / 25), atol=1e-6)


def test_prior_minimum_is_on_the_gaussian_shell():
    d = 256
    u = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    u = u / u.norm()
    radii = torch.linspace(10, 22, 1201)
    vals = torch.stack([noise.noise_prior(u * r, "reno") for r in radii]).flatten()
    assert radii[vals.argmin()].item() == pytest.approx(math.sqrt(d - 1), abs=0.02)
    vals = torch.stack([noise.noise_prior(u * r, "chi2") for r in radii]).flatten()
    assert radii[vals.argmin()].item() == pytest.approx(math.sqrt(d - 2), abs=0.02)


def test_prior_is_per_sample():
    a = torch.tensor([1.0, 2.0, 2.0, 4.0]).view(1, 1, 2, 2)
    b = torch.tensor([3.0, 0.0, 0.0, 4.0]).view(1, 1, 2, 2)
    both = noise.noise_prior(torch.cat([a, b]), "reno")
    assert both[0].item() == pytest.approx(noise.noise_prior(a, "reno").item())
    assert both[1].item() == pytest.approx(noise.noise_prior(b, "reno").item())


def test_gradient_clipping_is_per_sample():
    g = torch.tensor([[3.0, 4.0], [0.03, 0.04]]).view(2, 1, 1, 2)  # norms 5 and 0.05
    norms = noise.clip_grad_per_sample(g, 0.1)
    assert norms.tolist() == pytest.approx([5.0, 0.05])
    assert g[0].flatten().tolist() == pytest.approx([0.06, 0.08])  # scaled to norm 0.1
    assert g[1].flatten().tolist() == pytest.approx([0.03, 0.04])  # under the limit: unchanged


def test_preview_sigmas_subsample_the_full_schedule(tiny_adapter):
    full = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert noise.preview_sigmas(full, 2).tolist() == [1.0, 0.5, 0.0]
    assert noise.preview_sigmas(full, 4).tolist() == full.tolist()
    assert noise.preview_sigmas(full, 1).tolist() == [1.0, 0.0]
    # the scheduler's own 2-step schedule ends 0.001 -> 0 (one real step); the subsampled one has two
    own = tiny_adapter.schedule(2)
    assert own[-2].item() < 0.01
    sub = noise.preview_sigmas(tiny_adapter.schedule(20), 2)
    assert sub[0].item() == 1.0 and 0.4 < sub[1].item() < 0.6 and sub[2].item() == 0.0
    with pytest.raises(NoiseOptError, match="sampler_steps must be between 1 and the sampling steps"):
        noise.preview_sigmas(full, 5)


# ------------------------------------------------------------------------------------------------ FK pieces
def test_fk_potentials_by_hand():
    r1, r2 = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.1])
    st = {}
    assert noise.fk_log_potential("max", r1, st).tolist() == pytest.approx([0.2, 0.5])
    assert noise.fk_log_potential("max", r2, st).tolist() == pytest.approx([0.4, 0.5])
    st = {}
    noise.fk_log_potential("sum", r1, st)
    assert noise.fk_log_potential("sum", r2, st).tolist() == pytest.approx([0.6, 0.6])
    st = {}
    assert noise.fk_log_potential("difference", r1, st).tolist() == pytest.approx([0.2, 0.5])
    assert noise.fk_log_potential("difference", r2, st).tolist() == pytest.approx([0.2, -0.4])


def test_fk_weights_and_ess_by_hand():
    w = noise.normalized_weights(torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]))
    assert w[0].tolist() == pytest.approx([0.25, 0.75])
    assert w[1].tolist() == pytest.approx([0.5, 0.5])
    ess = noise.effective_sample_size(w)
    assert ess[0].item() == pytest.approx(1 / (0.25 ** 2 + 0.75 ** 2))  # 1.6
    assert ess[1].item() == pytest.approx(2.0)
    # lam * potential: exp(10 * [0.1, 0.2, 0.3]) normalised
    w = noise.normalized_weights(10 * torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    e = np.exp([1.0, 2.0, 3.0])
    assert w.tolist() == pytest.approx((e / e.sum()).tolist())


def test_systematic_resampling_by_hand():
    w = torch.tensor([0.5, 0.3, 0.2])
    # positions (0.3 + k) / 3 = 0.1, 0.433, 0.767 against cumulative weights 0.5, 0.8, 1.0
    assert noise.resample_indices(w, "systematic", u=0.3).tolist() == [0, 0, 1]
    # positions 0.3, 0.633, 0.967
    assert noise.resample_indices(w, "systematic", u=0.9).tolist() == [0, 1, 2]
    assert noise.resample_indices(torch.tensor([0.0, 1.0, 0.0]), "systematic", u=0.0).tolist() == [1, 1, 1]


def test_multinomial_resampling_follows_the_weights():
    g = torch.Generator().manual_seed(0)
    assert noise.resample_indices(torch.tensor([0.0, 1.0, 0.0]), "multinomial", g).tolist() == [1, 1, 1]
    counts = torch.bincount(torch.cat([noise.resample_indices(torch.tensor([0.25, 0.75]), "multinomial", g)
                                       for _ in range(2000)]), minlength=2)
    assert counts[1].item() / counts.sum().item() == pytest.approx(0.75, abs=0.02)  # 4000 draws: SE 0.007


def test_rank_correlation_with_ties_by_hand():
    # ranks [1, 2, 3, 4] vs [1.5, 1.5, 3.5, 3.5]: covariance 4 / (sqrt(5) * 2)
    assert noise.rank_correlation([1, 2, 3, 4], [0, 0, 1, 1]) == pytest.approx(4 / (2 * math.sqrt(5)))
    assert noise.rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(noise.rank_correlation([1, 2, 3], [1, 1, 1]))


# ------------------------------------------------------------------------------------------------ on the tiny model
def test_reno_raises_a_differentiable_reward(tiny_adapter, shapeclip):
    res = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "reno", iterations=6, sampler_steps=2,
                   num_steps=4, guidance=3.0, seed=0, checkpointing=True)
    t = res.trajectory  # (7, 2): the preview reward of every iterate
    assert t.shape == (7, 2)
    # the reward of the last iterate beats the first for each prompt, and the best is kept
    assert (t[-1] - t[0] > 1.0).all(), t  # shapeclip is logit_scale x cosine: +1 is +0.024 in cosine
    assert res.info["best_preview_reward"] == pytest.approx(t.max(0).values.tolist())
    # the returned noise moved, and stays near the Gaussian shell (prior): ||z|| / sqrt(d) within 10%
    d = res.noises[0].numel()
    assert (res.noises.flatten(1).norm(dim=1) / math.sqrt(d) - 1).abs().max() < 0.1


def test_reno_final_image_is_the_full_render_of_the_best_noise(tiny_adapter, shapeclip):
    from flowalign.rollout import sample_ode

    res = optimize(tiny_adapter, SHAPECLIP_PROMPTS[:1], shapeclip, "reno", iterations=2, num_steps=3, seed=1)
    cond = tiny_adapter.encode(SHAPECLIP_PROMPTS[:1], negative="")
    with torch.no_grad():
        img = sample_ode(tiny_adapter, cond, 3, 3.0, res.noises)
        r = shapeclip(img, SHAPECLIP_PROMPTS[:1])["reward"]
    assert torch.allclose(img, res.images, atol=1e-5)
    assert res.rewards["reward"].tolist() == pytest.approx(r.tolist(), abs=1e-4)


def test_reno_batched_equals_one_prompt_at_a_time(tiny_adapter, shapeclip):
    kw = dict(iterations=3, num_steps=2, seed=5, checkpointing=False)
    both = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "reno", **kw)
    second = optimize(tiny_adapter, SHAPECLIP_PROMPTS[1:], shapeclip, "reno", indices=[1], **kw)
    assert torch.allclose(both.noises[1], second.noises[0], atol=1e-4)
    assert torch.allclose(both.trajectory[:, 1], second.trajectory[:, 0], atol=1e-3)


def test_reno_chunked_gives_the_unchunked_result(tiny_adapter, shapeclip):
    # three prompts optimised in chunks of 2 (2 + 1 rows) and of 1 give the iterates of one batch: the loss is a sum
    # over rows, the clipping per row and SGD per element, so only float rounding of the batched forwards differs
    P = SHAPECLIP_PROMPTS + ["a photo of a blue triangle"]
    kw = dict(iterations=3, num_steps=3, sampler_steps=2, seed=4, checkpointing=False)
    one = optimize(tiny_adapter, P, shapeclip, "reno", **kw)
    for chunk in (2, 1):
        c = optimize(tiny_adapter, P, shapeclip, "reno", chunk=chunk, **kw)
        assert torch.allclose(one.noises, c.noises, atol=1e-5), chunk
        assert torch.allclose(one.trajectory, c.trajectory, atol=1e-3), chunk
        assert torch.allclose(one.images, c.images, atol=1e-5), chunk
        assert c.nfe == one.nfe and c.info["chunk"] == chunk
    # the noise really moved (the comparison is not of three unoptimised starts)
    assert (one.noises - noise.optimize(tiny_adapter, P, shapeclip, "best_of_n", n=1, num_steps=3, seed=4)
            .noises).abs().max() > 1e-3
    with pytest.raises(NoiseOptError, match="chunk"):
        optimize(tiny_adapter, P, shapeclip, "reno", chunk=0, **kw)


def test_fk_without_noise_or_potential_is_best_of_n(tiny_adapter, shapeclip):
    # lam 0 and no SDE step (sde_from past sde_until): K independent ODE samples from candidates 0..K-1, the best
    # by reward kept -- best-of-K exactly
    kw = dict(num_steps=4, seed=3)
    fk = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "fk", particles=3, lam=0.0, resample_at=[1],
                  sde_from=4, **kw)
    bon = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "best_of_n", n=3, **kw)
    assert torch.allclose(fk.images, bon.images, atol=1e-5)
    assert torch.equal(fk.noises, bon.noises)
    assert fk.info["sde_from"] == 4
    # sde_from="first_resample": the SDE starts at the first resampling step (here 2), so the result is no longer
    # best-of-N's
    late = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "fk", particles=3, lam=0.0, resample_at=[2],
                    sde_from="first_resample", **kw)
    assert late.info["sde_from"] == 2
    assert not torch.allclose(late.images, bon.images, atol=1e-3)


def test_fk_sde_starts_at_the_first_resampling_step_by_default(tiny_adapter, shapeclip):
    # one particle, lam 0, 4 steps, resampling at step 2: ODE steps 0 and 1, the SDE step 2 (sde_until = 4 - 2),
    # the ODE step 3 -- rebuilt by hand from the same noises
    from flowalign import samplers, seeding

    P = SHAPECLIP_PROMPTS[:1]
    fk = optimize(tiny_adapter, P, shapeclip, "fk", particles=1, lam=0.0, resample_at=[2], num_steps=4, seed=6)
    assert fk.info["sde_from"] == 2 and fk.info["sde_until"] == 2
    sig = tiny_adapter.schedule(4)
    cond = tiny_adapter.encode(P, negative="")
    x = tiny_adapter.init_noise(1, torch.Generator().manual_seed(6))
    g = seeding.generator(6, "noise/fk", 0)
    with torch.no_grad():
        for i in range(4):
            v = tiny_adapter.predict(x, sig[i], cond, 3.0)
            if i == 2:
                eps = torch.randn((1, *x.shape[1:]), generator=g)
                x = samplers.flow_sde_step(x, v, sig[i], sig[i + 1], 0.7, sigma_cap=float(sig[1]), noise=eps).next
            else:
                x = samplers.ode_step(x, v, sig[i], sig[i + 1]).next
    assert torch.allclose(fk.latents, x, atol=1e-5)
    old = optimize(tiny_adapter, P, shapeclip, "fk", particles=1, lam=0.0, resample_at=[2], num_steps=4, seed=6,
                   sde_from=0)  # SDE steps 0..2: another sample
    assert not torch.allclose(old.latents, x, atol=1e-3)


def test_checkpointing_changes_the_cost_not_the_result(tiny_adapter, shapeclip):
    kw = dict(iterations=3, num_steps=3, sampler_steps=2, seed=2)
    a = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "reno", checkpointing=False, **kw)
    b = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "reno", checkpointing=True, **kw)
    assert torch.allclose(a.trajectory, b.trajectory, atol=1e-4)
    assert torch.allclose(a.noises, b.noises, atol=1e-5)
    # 3 iterations x 2 steps x 2 CFG rows recomputed
    assert b.nfe_per_prompt - a.nfe_per_prompt == 3 * 2 * 2


def test_peak_memory_sees_an_allocation():
    import time

    with noise.PeakMemory("cpu") as m:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB
        time.sleep(0.05)
        del x
    assert m.peak_mb - m.start_mb > 50


def test_results_reproduce_from_a_seed(tiny_adapter, shapeclip):
    for method, kw in (("best_of_n", dict(n=3)), ("reno", dict(iterations=2)),
                       ("fk", dict(particles=3, resample_at=[1], lam=5.0))):
        a = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, method, num_steps=3, seed=7, **kw)
        b = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, method, num_steps=3, seed=7, **kw)
        c = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, method, num_steps=3, seed=8, **kw)
        assert torch.equal(a.images, b.images) and torch.equal(a.noises, b.noises), method
        assert torch.equal(a.trajectory, b.trajectory), method
        assert not torch.allclose(a.noises, c.noises), method


def test_best_of_n_first_candidate_is_the_evaluation_base_sample(tiny_adapter, shapeclip):
    from flowalign.eval.benchmark import generate

    base = generate(tiny_adapter, SHAPECLIP_PROMPTS, num_steps=3, guidance=3.0, seed=11)
    one = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "best_of_n", n=1, num_steps=3, seed=11)
    got = (one.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.abs(got.astype(int) - base.astype(int)).max() <= 1
    four = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "best_of_n", n=4, num_steps=3, seed=11)
    # best-so-far never falls, the first entry is the base sample's reward, the result is the last entry
    t = four.trajectory
    assert (t[1:] >= t[:-1]).all()
    assert t[0].tolist() == pytest.approx(one.rewards["reward"].tolist(), abs=1e-4)
    assert four.rewards["reward"].tolist() == pytest.approx(t[-1].tolist(), abs=1e-5)


def test_fk_without_potential_never_resamples_and_strong_potential_concentrates(tiny_adapter, shapeclip):
    flat = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "fk", particles=4, num_steps=4, resample_at=[1, 2],
                    lam=0.0, seed=0)
    assert flat.info["ess"] == [[4.0, 4.0], [4.0, 4.0]]
    assert flat.info["resampled"] == [[False, False], [False, False]]
    # never resampled: every particle keeps its own initial noise
    assert flat.info["ancestors"] == [[4, 4], [4, 4]] and flat.info["final_ancestors"] == [4, 4]
    sharp = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "fk", particles=4, num_steps=4, resample_at=[1],
                     lam=1e4, seed=0, noise_level=0.0)
    # lam huge: all weight on the best particle; ESS ~ 1, resampled, and with an ODE (no noise) the four particles
    # are copies of the winner
    assert all(e == pytest.approx(1.0, abs=1e-3) for e in sharp.info["ess"][0])
    assert sharp.info["resampled"] == [[True, True]]
    p = sharp.particles
    assert torch.allclose(p[:, 0:1].expand_as(p), p)
    # ... all descending from one initial noise: one distinct ancestor per prompt
    assert sharp.info["ancestors"] == [[1, 1]] and sharp.info["final_ancestors"] == [1, 1]


def test_fk_potential_reward_steers_and_the_final_pick_uses_the_main_reward(tiny_adapter, shapeclip):
    kw = dict(particles=4, num_steps=4, resample_at=[1], lam=1e4, seed=0, noise_level=0.0)
    own = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "fk", **kw)
    # the candidates' x0-hat at step 1, scored by hand: a potential of +shapeclip keeps the best of them, one of
    # -shapeclip the worst (lam huge, ODE after the resampling: every particle is a copy of that one)
    neg = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "fk",
                   potential_reward={"shapeclip": -1.0}, **kw)
    assert neg.info["ancestors"] == [[1, 1]] and own.info["ancestors"] == [[1, 1]]
    assert not torch.equal(neg.noises, own.noises)  # steered to another candidate
    # the final pick and the reported rewards are the main reward's (shapeclip, not its negative)
    direct = shapeclip(neg.images, list(SHAPECLIP_PROMPTS))["reward"]
    assert neg.rewards["reward"].tolist() == pytest.approx(direct.tolist(), abs=1e-4)
    assert neg.info["potential_reward"] is not None and own.info["potential_reward"] is None
    with pytest.raises(NoiseOptError, match="potential_reward is an FK option"):
        optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "best_of_n", n=2, num_steps=2,
                 potential_reward=shapeclip)


def test_nfe_counts_match_the_formula(tiny_adapter, shapeclip):
    P = SHAPECLIP_PROMPTS
    # steps 2, CFG 3 -> one full sample is 2 steps x 2 rows = 4 forwards
    cases = [
        ("best_of_n", dict(n=3), 3 * 4),
        ("fk", dict(particles=3, resample_at=[1]), 3 * 4),
        # iterations x (forward 2 + backward 2 x 2) + the last iterate's forward 2 + the full render 4
        ("reno", dict(iterations=2, sampler_steps=1, checkpointing=False), 2 * 6 + 2 + 4),
        # checkpointing recomputes each forward once in the backward: + 2 per iteration
        ("reno", dict(iterations=2, sampler_steps=1, checkpointing=True), 2 * 8 + 2 + 4),
        # two sampler steps (the default) double every few-step term
        ("reno", dict(iterations=1, sampler_steps=2, checkpointing=False), 12 + 4 + 4),
        # explore 3 x 2 + top 2 x (1 iteration x 6 + last forward 2) + 2 full renders x 4
        ("carinox", dict(n_explore=3, top_k=2, iterations=1, sampler_steps=1, checkpointing=False),
         6 + 2 * 8 + 2 * 4),
    ]
    for method, kw, per_prompt in cases:
        res = optimize(tiny_adapter, P, shapeclip, method, num_steps=2, guidance=3.0, **kw)
        assert res.nfe == per_prompt * len(P), (method, kw, res.nfe)
        assert res.nfe_per_prompt == per_prompt
        assert noise.cost_per_prompt(method, 2, True, **kw) == per_prompt
    # without CFG one row per evaluation
    res = optimize(tiny_adapter, P, shapeclip, "best_of_n", n=3, num_steps=2, guidance=1.0)
    assert res.nfe_per_prompt == 3 * 2


def test_budget_sets_the_count(tiny_adapter, shapeclip):
    res = optimize(tiny_adapter, SHAPECLIP_PROMPTS[:1], shapeclip, "best_of_n", budget=13, num_steps=2)
    assert res.info["n"] == 3 and res.nfe_per_prompt == 12  # 13 // 4
    res = optimize(tiny_adapter, SHAPECLIP_PROMPTS[:1], shapeclip, "reno", budget=30, num_steps=2,
                   sampler_steps=1, checkpointing=False)
    assert res.info["iterations"] == 4 and res.nfe_per_prompt == 30  # (30 - 2 - 4) // 6
    res = optimize(tiny_adapter, SHAPECLIP_PROMPTS[:1], shapeclip, "reno", budget=60, num_steps=2)
    # two sampler steps with checkpointing: (60 - 4 - 4) // 16 = 3 iterations, 3 x 16 + 4 + 4 = 56 NFE
    assert res.info["iterations"] == 3 and res.nfe_per_prompt == 56
    with pytest.raises(NoiseOptError, match="below one full sample"):
        optimize(tiny_adapter, SHAPECLIP_PROMPTS[:1], shapeclip, "fk", budget=3, num_steps=2)


def test_result_summary_is_json(tiny_adapter, shapeclip):
    res = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "fk", particles=2, num_steps=3, resample_at=[1])
    s = json.loads(json.dumps(res.summary()))
    assert s["method"] == "fk" and s["nfe"] == res.nfe and len(s["reward"]) == 2
    assert s["seconds"] > 0 and s["peak_memory_mb"] > 0
    assert len(s["trajectory"]) == 2  # one resampling step + the final particles


# ------------------------------------------------------------------------------------------------ CARINOX
def test_select_rewards_picks_the_reward_that_ranks_like_the_judge():
    from flowalign.shapeworld.world import render_batch

    imgs, metas = render_batch(24, seed=0, tasks=("colors", "counting"))
    # tasks alternate; in each task every other image gets another record's prompt of that task: the judge mostly
    # says no, and a good reward scores it lower
    assert [m["tag"] for m in metas[:4]] == ["colors", "counting", "colors", "counting"]
    wrong = [metas[(i + 4) % len(metas)] if (i // 2) % 2 else metas[i] for i in range(len(metas))]
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    sel = noise.select_rewards(images, wrong, {"shapeclip": "shapeclip", "artifact": "artifact"},
                               noise.shapeworld_judge)
    judge = np.array(noise.shapeworld_judge(wrong, imgs))
    for cat in ("colors", "counting"):
        rows = [i for i, m in enumerate(wrong) if m["tag"] == cat]
        from flowalign.rewards import build_reward

        s = build_reward("shapeclip")(images[rows], [wrong[i]["prompt"] for i in rows])["reward"].numpy()
        assert sel.correlations[cat]["shapeclip"] == pytest.approx(noise.rank_correlation(s, judge[rows]), abs=1e-6)
        assert sel.chosen[cat] == "shapeclip"
        assert sel.correlations[cat]["shapeclip"] > sel.correlations[cat]["artifact"]
    assert sel.category_rewards() == {"colors": "shapeclip", "counting": "shapeclip"}
    assert "| colors |" in sel.table()


def test_carinox_routes_rewards_by_category(tiny_adapter, shapeclip):
    meta = [{"tag": "colors", "prompt": SHAPECLIP_PROMPTS[0], "include": [{"class": "circle", "count": 1,
                                                                            "color": "red"}]},
            {"tag": "counting", "prompt": SHAPECLIP_PROMPTS[1], "include": [{"class": "square", "count": 2}]}]
    res = optimize(tiny_adapter, SHAPECLIP_PROMPTS, shapeclip, "carinox", metadata=meta, num_steps=2, n_explore=3,
                   top_k=2, iterations=1, sampler_steps=1, category_rewards={"counting": "artifact"})
    per = res.info["reward_per_category"]
    assert "ShapeClip" in per["colors"] and "Artifact" in per["counting"]
    from flowalign.rewards import build_reward

    art = build_reward("artifact")(res.images[1:], SHAPECLIP_PROMPTS[1:])["reward"]
    assert res.rewards["reward"][1].item() == pytest.approx(art.item(), abs=1e-5)
    # checkpointing on (the default): explore 3 x 2 + 2 x (1 iteration x 8 + last forward 2) + 2 renders x 4
    assert res.images.shape[0] == 2 and res.nfe_per_prompt == 6 + 2 * (8 + 2) + 2 * 4


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(rewards="shapeworld", method="reno"),
     "reward 'shapeworld' is not differentiable: reno needs gradients from the reward; use method 'best_of_n' "
     "or 'fk'"),
    (dict(rewards={"shapeclip": 1.0, "shapeworld": 1.0}, method="carinox"), "reward 'shapeworld' is not "
     "differentiable"),
    (dict(iterations=0), "steps (iterations) must be a positive integer, got 0"),
    (dict(iterations=-3), "steps (iterations) must be a positive integer, got -3"),
    (dict(num_steps=0), "num_steps (sampling steps) must be a positive integer, got 0"),
    (dict(method="annealing"), "unknown method 'annealing'; known methods: best_of_n, reno, carinox, fk"),
    (dict(prompts=["a photo of a circle", "  "]), "prompt 1 is empty"),
    (dict(prompts=[]), "no prompts given"),
    (dict(method="fk", lr=3.0), "method 'fk' has no option(s) 'lr'"),
    (dict(method="fk", potential="min"), "unknown FK potential 'min'; known potentials: max, difference, sum"),
])
def test_bad_input_is_one_line(tiny_adapter, kwargs, message):
    kw = dict(prompts=SHAPECLIP_PROMPTS[:1], rewards="shapeclip", method="reno", num_steps=2, iterations=1)
    if kwargs.get("method") in ("fk", "annealing"):
        kw.pop("iterations")
    kw.update(kwargs)
    with pytest.raises(NoiseOptError) as e:
        optimize(tiny_adapter, kw.pop("prompts"), kw.pop("rewards"), kw.pop("method"), **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_metadata_reward_without_metadata_is_an_error(tiny_adapter):
    with pytest.raises(NoiseOptError, match="needs metadata"):
        optimize(tiny_adapter, SHAPECLIP_PROMPTS[:1], "shapeworld", "best_of_n", n=1, num_steps=2)


# ------------------------------------------------------------------------------------------------ CLI
def _cli(args, capsys):
    from flowalign.cli import main

    code = main(["optimize-noise", *args])
    return code, capsys.readouterr()


def test_cli_writes_images_plots_and_result(tiny_sd3, tmp_path, capsys):
    out = tmp_path / "run"
    code, cap = _cli(["--model", tiny_sd3, "--prompt", "a photo of a red circle", "--reward", "shapeclip=1",
                      "--method", "reno", "--steps", "2", "--sample-steps", "2", "--out", str(out)], capsys)
    assert code == 0, cap.err
    for f in ("result.json", "before_after.png", "reward_curve.png", "images/0000.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "result.json").read_text())
    assert res["method"] == "reno" and res["nfe_per_prompt"] == noise.cost_per_prompt("reno", 2, True, iterations=2)
    assert len(res["per_prompt"]) == 1 and "judges" in res  # a ShapeWorld prompt: judged before and after
    assert "reward" in cap.out and "NFE" in cap.out


def test_cli_batch_from_a_metadata_file(tiny_sd3, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    recs = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
            {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square",
                                                                                         "count": 3}],
             "prompt": "a photo of two squares"},
            {"tag": "colors", "include": [{"class": "cross", "count": 1, "color": "blue"}],
             "prompt": "a photo of a blue cross"}]
    f.write_text("\n".join(json.dumps(r) for r in recs))
    out = tmp_path / "batch"
    code, cap = _cli(["--model", tiny_sd3, "--prompts", str(f), "--reward", "shapeworld", "--method", "fk",
                      "--particles", "2", "--sample-steps", "3", "--batch-size", "2", "--out", str(out)], capsys)
    assert code == 0, cap.err
    res = json.loads((out / "result.json").read_text())
    assert [p["prompt"] for p in res["per_prompt"]] == [r["prompt"] for r in recs]
    assert res["nfe"] == 3 * 2 * 3 * 2 and len(list((out / "images").glob("*.png"))) == 3
    # chunked in twos: prompt 2 keeps its index, so it equals a run of the three together
    out2 = tmp_path / "batch3"
    _cli(["--model", tiny_sd3, "--prompts", str(f), "--reward", "shapeworld", "--method", "fk", "--particles", "2",
          "--sample-steps", "3", "--batch-size", "3", "--out", str(out2)], capsys)
    a = json.loads((out2 / "result.json").read_text())
    assert [p["reward_after"] for p in a["per_prompt"]] == pytest.approx([p["reward_after"] for p in
                                                                          res["per_prompt"]])
    # FK with another reward as the potential, resampling at step 1 only: the options reach optimize()
    out3 = tmp_path / "hybrid"
    code, cap = _cli(["--model", tiny_sd3, "--prompts", str(f), "--reward", "shapeworld", "--method", "fk",
                      "--particles", "2", "--sample-steps", "3", "--potential-reward", "shapeclip=1",
                      "--resample-at", "1", "--out", str(out3)], capsys)
    assert code == 0, cap.err
    h = json.loads((out3 / "result.json").read_text())
    assert h["info"][0]["resample_at"] == [1] and "shapeclip" in h["info"][0]["potential_reward"]


@pytest.mark.parametrize("args, message", [
    (["--reward", "shapeworld", "--method", "reno", "--steps", "2"],
     "reward 'shapeworld' is not differentiable: reno needs gradients"),
    (["--method", "reno", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--method", "reno", "--steps", "-1"], "--steps must be a positive integer, got -1"),
    (["--method", "simulated-annealing"], "unknown method 'simulated-annealing'; known methods: best_of_n, reno, "
                                          "carinox, fk"),
    (["--prompt", "", "--method", "reno"], "--prompt is empty"),
    (["--method", "bon", "--steps", "4"], "--steps counts ReNO/CARINOX iterations; method best_of_n takes --n"),
    (["--reward", "nosuchreward", "--method", "bon"], "unknown reward 'nosuchreward'"),
    (["--method", "bon", "--potential-reward", "shapevalue"], "--potential-reward applies to --method fk only"),
    (["--method", "fk", "--resample-at", "4,x"], "--resample-at takes comma-separated step indices, got '4,x'"),
    (["--method", "fk", "--potential-reward", "nosuchreward"], "unknown reward 'nosuchreward'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_sd3, tmp_path, capsys, args, message):
    base = ["--model", tiny_sd3, "--sample-steps", "2", "--out", str(tmp_path / "x")]
    if "--prompt" not in args:
        base += ["--prompt", "a photo of a circle"]
    code, cap = _cli(base + args, capsys)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowalign: error: ") and message in lines[0], cap.err
