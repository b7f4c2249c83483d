"""The SDXL adapter (added time ids + pooled embeddings, DDPM flow view, DDIM) against the stock
StableDiffusionXLPipeline on a tiny random replica saved in the real layout; the one-step (SDXL-Turbo) path."""
import pytest
import torch

from flowalign.pipelines.base import load_adapter
from flowalign.pipelines._shared import ddim_scheduler
from flowalign.pipelines.sdxl import SDXLAdapter
from flowalign.rollout import replay_step, rollout, sample_ode, sde_mask
from tiny_families import build_tiny_sdxl

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


def stock_image(pipe, z, steps, guidance):
    return pipe(prompt=PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=guidance, height=32,
                width=32, output_type="pt").images.float()


def vp_draw(seed):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_family_detected(tiny_sdxl):
    ad = load_adapter(tiny_sdxl)
    assert isinstance(ad, SDXLAdapter) and ad.prediction_type == "epsilon"
    assert type(ad.pipe.scheduler).__name__ == "DDIMScheduler"


@pytest.mark.parametrize("steps,guidance", [(4, 1.0), (4, 5.0), (1, 1.0)])
def test_ddim_sampler_reproduces_the_stock_pipeline(tiny_sdxl, steps, guidance):
    """Noise level 0, the same x_T: the stock image, with CFG (zeros as the empty negative, as the stock default)
    and in one step (the SDXL-Turbo path: trailing spacing starts at the top timestep)."""
    ad = SDXLAdapter.from_pretrained(tiny_sdxl)
    cond = ad.encode(PROMPTS, negative="" if guidance > 1 else None)
    if guidance > 1:
        assert cond.neg_embeds.abs().max() == 0 and cond.neg_pooled.abs().max() == 0  # force_zeros_for_empty_prompt
    ours = sample_ode(ad, cond, steps, guidance, ad.init_noise(2, torch.Generator().manual_seed(3)))
    assert (ours - stock_image(ad.pipe, vp_draw(3), steps, guidance)).abs().max().item() < 1e-5


def test_added_time_ids_condition_the_unet(tiny_sdxl):
    ad = SDXLAdapter.from_pretrained(tiny_sdxl)
    x = torch.randn(1, 4, 8, 8)
    assert ad.time_ids(x).tolist() == [[32, 32, 0, 0, 32, 32]]
    cond = ad.encode(PROMPTS[:1], negative=None)
    t = torch.tensor([500.0])
    with torch.no_grad():
        a = ad._call(ad.unet, x, t, cond, negative=False)
        ad.time_ids = lambda x: torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=x.dtype)  # another image size
        b = ad._call(ad.unet, x, t, cond, negative=False)
    assert (a - b).abs().max() > 1e-6


def test_rollout_log_probs_and_on_policy_ratio(tiny_sdxl):
    ad = SDXLAdapter.from_pretrained(tiny_sdxl)
    prompts = PROMPTS * 2
    sig = ad.schedule(2)
    tr = rollout(ad, ad.encode(prompts), sig, 3.0, 1.0, sde_mask(2, "all"), kernel="ddim",
                 generator=torch.Generator().manual_seed(0), prompts=prompts)
    assert torch.all(tr.log_probs != 0)
    with torch.no_grad():
        for i in range(2):
            assert torch.equal(replay_step(ad, tr, i, kernel="ddim").log_prob, tr.log_probs[:, i])


def test_lora_saved_and_loaded_by_the_stock_pipeline(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ad = SDXLAdapter.from_pretrained(tiny_sdxl)
    params = ad.add_lora(rank=4, alpha=8)
    cond = ad.encode(PROMPTS, negative="")
    x = ad.init_noise(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)  # a fixed perturbation: the test does not depend on test order
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ours = sample_ode(ad, cond, 2, 3.0, x.clone())
    ad.save_trained(tmp_path / "lora")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = ddim_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    before = stock_image(pipe, vp_draw(1), 2, 3.0)
    assert (before - ours).abs().max() > 1e-3
    pipe.load_lora_weights(str(tmp_path / "lora"))
    # 7e-6 measured: float rounding through 1/sqrt(ab_top) ~ 15 in x0 with a strongly perturbed UNet; the LoRA itself
    # moves the image by > 1e-3 (above)
    assert (stock_image(pipe, vp_draw(1), 2, 3.0) - ours).abs().max() < 5e-5
    ad2 = SDXLAdapter.from_pretrained(tiny_sdxl)  # and the adapter's own load_trained reproduces it
    ad2.load_trained(tmp_path / "lora")
    assert (sample_ode(ad2, ad2.encode(PROMPTS, negative=""), 2, 3.0, x.clone()) - ours).abs().max() < 1e-5


def test_one_step_noise_optimisation(tiny_sdxl):
    """ReNO through the one-step (Turbo) path: z -> one DDIM step -> decode -> reward, gradients back to z."""
    from flowalign.noise import optimize
    from test_adapter_sd15 import Brightness

    ad = SDXLAdapter.from_pretrained(tiny_sdxl)
    res = optimize(ad, PROMPTS, Brightness(), "reno", iterations=2, sampler_steps=1, num_steps=1, guidance=1.0, seed=0)
    assert torch.isfinite(res.trajectory).all() and (res.trajectory[-1] > res.trajectory[0]).all()
    # ReNO's norm prior is on x_T / init_noise_std: x_T is z / (sqrt(ab_T) + sqrt(1 - ab_T)) here (~6% shorter than
    # a standard normal draw), and that quotient is the stock pipeline's standard normal z
    assert 0.9 < ad.init_noise_std < 0.97
    x = ad.init_noise(2, torch.Generator().manual_seed(4))
    assert torch.allclose(x / ad.init_noise_std, vp_draw(4), atol=1e-6)


@pytest.mark.parametrize("algo", ["ddpo", "nft"])
def test_one_training_step_through_the_trainer(tiny_sdxl, tmp_path, algo):
    from test_trainer import tiny_cfg

    from flowalign.trainer import Trainer

    over = dict(sample__kernel="ddim", sample__noise_level=1.0, sample__sde_steps="all") if algo == "ddpo" else {}
    t = Trainer(tiny_cfg(tiny_sdxl, tmp_path / "run", algorithm={"name": algo}, sample__num_steps=2,
                         train__iterations=1, train__updates_per_iter=1, **over))
    before = {k: v.detach().clone() for k, v in t.trainable_state().items()}
    traj, rew, groups = t.collect(0)
    adv, _ = t.advantages(rew["reward"], groups)
    rec = t.train_on(traj, adv, 0)
    assert any((t.trainable_state()[k] - before[k]).abs().max() > 0 for k in before), rec
    if algo == "ddpo":
        assert rec["onpolicy_ratio_dev"] < 1e-5
