"""The SD1.5 adapter (DDPM in the flow view, DDIM) against the stock StableDiffusionPipeline, on tiny random
replicas saved in the real layout (epsilon and v-prediction)."""
import contextlib
import math

import pytest
import torch

from flowalign.pipelines.base import ModelLoadError, load_adapter
from flowalign.pipelines.sd15 import SD15Adapter
from flowalign.rewards import Reward
from flowalign.rollout import replay_step, rollout, sample_ode, sde_mask
from tiny_families import build_tiny_sd15

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15"))


@pytest.fixture(scope="session")
def tiny_sd15_v(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15_v"), seed=1, prediction_type="v_prediction")


class Brightness(Reward):
    """Mean pixel value, differentiable: ReNO can climb it on a random model."""
    name = "test_diff_brightness"
    differentiable = True

    def score(self, images, prompts, metadata):
        return {"reward": images.mean(dim=(1, 2, 3))}


def stock_image(pipe, x_T_vp, steps, guidance, prompts=PROMPTS):
    return pipe(prompt=prompts, latents=x_T_vp.clone(), num_inference_steps=steps, guidance_scale=guidance,
                height=32, width=32, output_type="pt").images.float()


def test_family_detected_and_bad_paths(tiny_sd15, tmp_path):
    ad = load_adapter(tiny_sd15)
    assert isinstance(ad, SD15Adapter) and ad.prediction_type == "epsilon"
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_adapter(str(tmp_path))


@pytest.mark.parametrize("which,guidance,steps", [("eps", 1.0, 4), ("eps", 3.0, 4), ("v", 3.0, 4), ("eps", 1.0, 1)])
def test_ddim_sampler_reproduces_the_stock_pipeline(tiny_sd15, tiny_sd15_v, which, guidance, steps):
    """Noise level 0: the adapter's flow-view DDIM gives the stock pipeline's image for the same x_T (one step: the
    SD-Turbo path, trailing spacing from the top timestep)."""
    ad = SD15Adapter.from_pretrained(tiny_sd15 if which == "eps" else tiny_sd15_v)
    assert ad.prediction_type == ("epsilon" if which == "eps" else "v_prediction")
    g = torch.Generator().manual_seed(3)
    x = ad.init_noise(2, g)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))  # the stock pipeline's own draw
    ab_top = float(ad.scheduler.alphas_cumprod[-1])
    assert torch.allclose(x * (math.sqrt(ab_top) + math.sqrt(1 - ab_top)), z, atol=1e-6)
    ours = sample_ode(ad, ad.encode(PROMPTS, negative="" if guidance > 1 else None), steps, guidance, x.clone())
    stock = stock_image(ad.pipe, z, steps, guidance)
    assert ours.shape == (2, 3, 32, 32)
    assert (ours - stock).abs().max().item() < 1e-5
    # a different step count changes the image (the test can fail)
    assert (sample_ode(ad, ad.encode(PROMPTS, negative=None), 2 if steps != 2 else 3, 1.0, x.clone())
            - stock).abs().max() > 1e-3


def test_schedule_and_flow_view(tiny_sd15):
    ad = SD15Adapter.from_pretrained(tiny_sd15)
    s = ad.schedule(4)
    ab = ad.scheduler.alphas_cumprod.double()
    a, b = ab[999].sqrt(), (1 - ab[999]).sqrt()
    assert s.shape == (5,) and torch.all(s[1:] < s[:-1])
    assert abs(s[0].item() - (b / (a + b)).item()) < 1e-6           # trailing spacing: the top timestep first
    assert 0 < s[-1].item() < 0.05                                    # the final alpha_bar (set_alpha_to_one False)
    # predict is the flow velocity: x - sigma v is the UNet's x0 estimate at the same point
    cond = ad.encode(PROMPTS[:1], negative=None)
    x = torch.randn(1, 4, 8, 8)
    v = ad.predict(x, s[1], cond)
    x0, _, _ = ad._predictions(x, s[1], cond, 1.0, None, "both")
    assert torch.allclose(x - s[1] * v, x0, atol=1e-4)
    # between table sigmas (forward-process draws) the prediction is continuous
    v1, v2 = ad.predict(x, 0.5, cond), ad.predict(x, 0.5 + 1e-4, cond)
    assert (v1 - v2).abs().max() < 1e-2 and torch.isfinite(v1).all()


def test_rollout_log_probs_and_on_policy_ratio_exactly_one(tiny_sd15):
    ad = SD15Adapter.from_pretrained(tiny_sd15)
    prompts = PROMPTS * 2
    sig = ad.schedule(4)
    cond = ad.encode(prompts)
    tr = rollout(ad, cond, sig, 2.0, 1.0, sde_mask(4, "all"), generator=torch.Generator().manual_seed(0),
                 prompts=prompts, kernel="ddim")
    assert torch.all(tr.log_probs != 0) and torch.isfinite(tr.log_probs).all()
    with torch.no_grad():
        for i in range(4):
            assert torch.equal(replay_step(ad, tr, i, kernel="ddim").log_prob, tr.log_probs[:, i])
            sub = tr.index([3, 1])
            assert (replay_step(ad, sub, i, kernel="ddim").log_prob - sub.log_probs[:, i]).abs().max() < 1e-5
    # eta 1 differs from eta 0 (the DDIM sample is stochastic), and the flow SDE kernel runs on the flow view too
    ode = rollout(ad, cond, sig, 2.0, 0.0, torch.zeros(4, dtype=torch.bool), x=tr.latents[:, 0], prompts=prompts)
    assert (ode.latents[:, -1] - tr.latents[:, -1]).abs().max() > 1e-2
    sde = rollout(ad, cond, sig, 2.0, 0.7, sde_mask(4), x=tr.latents[:, 0], generator=torch.Generator().manual_seed(0),
                  prompts=prompts, kernel="sde")
    assert torch.equal(replay_step(ad, sde, 1, kernel="sde").log_prob, sde.log_probs[:, 1])


def test_lora_saved_and_loaded_by_the_stock_pipeline(tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    from flowalign.pipelines._shared import ddim_scheduler

    ad = SD15Adapter.from_pretrained(tiny_sd15)
    params = ad.add_lora(rank=4, alpha=8)
    assert params and all(p.requires_grad for p in params)
    x = ad.init_noise(2, torch.Generator().manual_seed(1))
    cond = ad.encode(PROMPTS)
    before = sample_ode(ad, cond, 4, 2.0, x.clone())
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)  # a fixed perturbation: the test does not depend on test order
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ours = sample_ode(ad, cond, 4, 2.0, x.clone())
    assert (ours - before).abs().max() > 1e-3                     # the LoRA changes the image
    with torch.no_grad(), ad.reference():                           # the reference: LoRA disabled
        assert torch.allclose(sample_ode(ad, cond, 4, 2.0, x.clone()), before, atol=1e-6)
    ad.save_trained(tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = ddim_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert (stock_image(pipe, z, 4, 2.0) - before).abs().max() < 1e-5
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert (stock_image(pipe, z, 4, 2.0) - ours).abs().max() < 1e-5
    # and the adapter's own load_trained reproduces it
    ad2 = SD15Adapter.from_pretrained(tiny_sd15)
    ad2.load_trained(tmp_path / "lora")
    assert (sample_ode(ad2, ad2.encode(PROMPTS), 4, 2.0, x.clone()) - ours).abs().max() < 1e-5


def test_full_finetune_save_reload_and_named_policies(tiny_sd15, tmp_path):
    ad = SD15Adapter.from_pretrained(tiny_sd15)
    params = ad.full_finetune()
    ad.add_policy("reference")
    ad.add_policy("old")
    cond = ad.encode(PROMPTS[:1], negative=None)
    x, sig = torch.randn(1, 4, 8, 8), ad.schedule(3)
    with torch.no_grad():
        base = ad.predict(x, sig[0], cond)
        params[0].add_(0.5)
        moved = ad.predict(x, sig[0], cond)
        with ad.reference():
            assert torch.equal(ad.predict(x, sig[0], cond), base)
        ad.lerp_policy("old", 0.5)
        with ad.policy("old"):
            half = ad.predict(x, sig[0], cond)
    assert (moved - base).abs().max() > 1e-4 and (half - base).abs().max() > 0 and (half - moved).abs().max() > 0
    ad.save_trained(tmp_path / "final")
    ad2 = SD15Adapter.from_pretrained(tiny_sd15)
    ad2.load_trained(tmp_path / "final")
    with torch.no_grad():
        assert torch.allclose(ad2.predict(x, sig[0], cond), moved, atol=1e-6)
    with pytest.raises(ModelLoadError, match="no trained weights"):
        ad2.load_trained(tmp_path)


def test_decode_is_differentiable(tiny_sd15):
    ad = SD15Adapter.from_pretrained(tiny_sd15)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    img = ad.decode(z, differentiable=True)
    assert img.shape == (2, 3, 32, 32) and 0 <= img.min() and img.max() <= 1
    img.mean().backward()
    assert z.grad.abs().sum() > 0


def test_noise_optimisation_step(tiny_sd15):
    """ReNO through the adapter: the differentiable preview (predict + Euler = DDIM) and decode(differentiable)."""
    from flowalign.noise import optimize

    ad = SD15Adapter.from_pretrained(tiny_sd15)
    res = optimize(ad, PROMPTS, Brightness(), "reno", iterations=2, sampler_steps=2, num_steps=2, guidance=2.0,
                   seed=0)
    assert res.trajectory.shape == (3, 2) and torch.isfinite(res.trajectory).all()
    x0 = torch.cat([ad.init_noise(1, torch.Generator().manual_seed(i)) for i in range(2)])
    assert (res.noises - x0).abs().max() > 1e-4                     # the noise moved
    assert (res.trajectory[-1] > res.trajectory[0]).all()           # and raised the reward


@pytest.mark.parametrize("algo", ["ddpo", "grpo", "nft"])
def test_one_training_step_through_the_trainer(tiny_sd15, tmp_path, algo):
    from test_trainer import tiny_cfg

    from flowalign.trainer import Trainer

    over = {"algorithm": {"name": algo}, "train__iterations": 1, "run__checkpoint_every": 0,
            "train__updates_per_iter": 1, "sample__num_steps": 3, "eval__num_steps": 2}
    if algo in ("ddpo", "grpo"):
        over.update(sample__kernel="ddim", sample__noise_level=1.0, sample__sde_steps="all")
    t = Trainer(tiny_cfg(tiny_sd15, tmp_path / "run", **over))
    assert t.model is t.adapter.unet or t.acc.unwrap_model(t.model) is t.adapter.unet
    before = {k: v.detach().clone() for k, v in t.trainable_state().items()}
    rec = t.train_on(*_collect(t))
    after = t.trainable_state()
    assert any((after[k] - before[k]).abs().max() > 0 for k in before), rec
    if algo != "nft":  # replayed in other batch compositions than the rollout's: equal up to float rounding
        assert rec["onpolicy_ratio_dev"] < 1e-5


def _collect(t):
    traj, rew, groups = t.collect(0)
    adv, _ = t.advantages(rew["reward"], groups)
    return traj, adv, 0


def test_gpu_options_are_guarded(tiny_sd15):
    """Written for GPUs, runnable here: xformers absent warns and keeps SDPA; VAE slicing / tiling switch on;
    text embeddings are cached per (prompts, negative); the images do not change."""
    import importlib.util

    plain = SD15Adapter.from_pretrained(tiny_sd15)
    with pytest.warns(UserWarning, match="xformers") if importlib.util.find_spec("xformers") is None else \
            contextlib.nullcontext():
        ad = SD15Adapter.from_pretrained(tiny_sd15, attention="xformers", vae_slicing=True, vae_tiling=True,
                                         cache_text=True)
    assert ad.vae.use_slicing and ad.vae.use_tiling
    assert ad.encode(PROMPTS) is ad.encode(PROMPTS) and ad.encode(PROMPTS) is not ad.encode(PROMPTS, negative=None)
    x = plain.init_noise(2, torch.Generator().manual_seed(0))
    assert torch.allclose(sample_ode(ad, ad.encode(PROMPTS), 2, 2.0, x.clone()),
                          sample_ode(plain, plain.encode(PROMPTS), 2, 2.0, x.clone()), atol=1e-6)
    with pytest.raises(ValueError, match="attention must be"):
        SD15Adapter.from_pretrained(tiny_sd15, attention="flash")
