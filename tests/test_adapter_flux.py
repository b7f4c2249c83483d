"""The FLUX.1 adapter against the stock FluxPipeline, on tiny random replicas of dev (guidance embedding) and
schnell (none) saved in the real layout, with a real (offline) T5 tokenizer and a tiny T5 encoder."""
import shutil

import pytest
import torch

from flowalign.pipelines.base import ModelLoadError, load_adapter
from flowalign.pipelines.flux import FluxAdapter
from flowalign.rollout import replay_step, rollout, sample_ode, sde_mask
from tiny_families import build_tiny_flux

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


@pytest.fixture(scope="session")
def tiny_dev(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux_dev"), guidance_embeds=True)


@pytest.fixture(scope="session")
def tiny_schnell(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux_schnell"), seed=1, guidance_embeds=False)


def load(path, **kw):
    return FluxAdapter.from_pretrained(path, resolution=32, **kw)


def stock(ad, x, steps, guidance, pipe=None, **kw):
    pipe = pipe or ad.pipe
    kw = dict(guidance_scale=guidance) if ad.guidance_embeds else \
        dict(true_cfg_scale=guidance, negative_prompt="" if guidance > 1 else None)
    return pipe(prompt=PROMPTS, latents=ad.pack(x.clone()), num_inference_steps=steps, height=32, width=32,
                max_sequence_length=ad.max_sequence_length, output_type="pt", **kw).images.float()


def test_family_detected(tiny_dev, tiny_schnell, tmp_path):
    dev, schnell = load_adapter(tiny_dev, resolution=32), load_adapter(tiny_schnell, resolution=32)
    assert isinstance(dev, FluxAdapter) and dev.guidance_embeds and not schnell.guidance_embeds
    assert dev.max_sequence_length == 16  # capped by the tokenizer's maximum
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_adapter(str(tmp_path / "missing"))


@pytest.mark.parametrize("which,guidance", [("dev", 3.5), ("schnell", 1.0), ("schnell", 3.0)])
def test_ode_sampler_reproduces_the_stock_pipeline(tiny_dev, tiny_schnell, which, guidance):
    ad = load(tiny_dev if which == "dev" else tiny_schnell)
    x = ad.init_noise(2, torch.Generator().manual_seed(3))
    assert x.shape == (2, 4, 8, 8)
    cond = ad.encode(PROMPTS, negative="" if guidance > 1 else None)
    ours = sample_ode(ad, cond, 4, guidance, x.clone())
    assert (ours - stock(ad, x, 4, guidance)).abs().max().item() < 1e-5
    if which == "dev":  # the guidance embedding is used: another scale, another image
        assert cond.neg_embeds is None
        assert (sample_ode(ad, cond, 4, 1.0, x.clone()) - ours).abs().max() > 1e-4


def test_pack_roundtrip_and_dynamic_shift(tiny_dev):
    ad = load(tiny_dev)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(ad.unpack(ad.pack(x), 8, 8), x)
    from diffusers import FluxPipeline
    assert torch.equal(ad.pack(x), FluxPipeline._pack_latents(x, 2, 4, 8, 8))
    s32, s64 = ad.schedule(4), ad.schedule(4, 64, 64)
    assert s32[0] == 1.0 and s32[-1] == 0.0 and torch.all(s32[1:] < s32[:-1])
    assert torch.all(s64[1:-1] > s32[1:-1])  # more image tokens, larger mu: more time at high noise


def test_without_t5(tiny_dev, tmp_path):
    d = tmp_path / "no_t5"
    shutil.copytree(tiny_dev, d)
    shutil.rmtree(d / "text_encoder_2")
    ad = load(str(d))
    assert ad.pipe.text_encoder_2 is None
    cond = ad.encode(PROMPTS, negative=None)
    assert cond.embeds.abs().max() == 0 and cond.pooled.abs().max() > 0
    x = ad.init_noise(1, torch.Generator().manual_seed(0)).expand(2, -1, -1, -1).clone()  # one x_T, two prompts
    img = sample_ode(ad, cond, 2, 3.5, x.clone())
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    # the prompt still reaches the image through the pooled CLIP embedding
    other = sample_ode(ad, ad.encode(PROMPTS[::-1], negative=None), 2, 3.5, x.clone())
    assert (img - other.flip(0)).abs().max() < 1e-5 and (img[0] - img[1]).abs().max() > 1e-5


@pytest.mark.parametrize("kernel", ["sde", "ddim"])
def test_rollout_log_probs_and_on_policy_ratio(tiny_schnell, kernel):
    ad = load(tiny_schnell)
    prompts = PROMPTS * 2
    sig = ad.schedule(3)
    tr = rollout(ad, ad.encode(prompts), sig, 2.0, 0.9 if kernel == "sde" else 1.0, sde_mask(3), kernel=kernel,
                 generator=torch.Generator().manual_seed(0), prompts=prompts)
    assert torch.all(tr.log_probs[:, :2] != 0) and torch.all(tr.log_probs[:, 2] == 0)
    with torch.no_grad():
        for i in range(2):
            assert torch.equal(replay_step(ad, tr, i, kernel=kernel).log_prob, tr.log_probs[:, i])


def test_lora_saved_and_loaded_by_the_stock_pipeline(tiny_dev, tmp_path):
    from diffusers import FluxPipeline

    ad = load(tiny_dev)
    params = ad.add_lora(rank=4, alpha=8)
    x = ad.init_noise(2, torch.Generator().manual_seed(1))
    cond = ad.encode(PROMPTS, negative=None)
    before = sample_ode(ad, cond, 3, 3.5, x.clone())
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)  # a fixed perturbation: the test does not depend on test order
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ours = sample_ode(ad, cond, 3, 3.5, x.clone())
    assert (ours - before).abs().max() > 1e-3
    ad.save_trained(tmp_path / "lora")
    pipe = FluxPipeline.from_pretrained(tiny_dev)
    pipe.set_progress_bar_config(disable=True)
    assert (stock(ad, x, 3, 3.5, pipe=pipe) - before).abs().max() < 1e-5
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert (stock(ad, x, 3, 3.5, pipe=pipe) - ours).abs().max() < 1e-5
    ad2 = load(tiny_dev)
    ad2.load_trained(tmp_path / "lora")
    assert (sample_ode(ad2, cond, 3, 3.5, x.clone()) - ours).abs().max() < 1e-5


def test_noise_optimisation_step_schnell(tiny_schnell):
    """ReNO on the one/few-step path (FLUX-schnell style: no CFG, 1-2 steps)."""
    from flowalign.noise import optimize
    from test_adapter_sd15 import Brightness

    ad = load(tiny_schnell)
    res = optimize(ad, PROMPTS, Brightness(), "reno", iterations=2, sampler_steps=1, num_steps=2, guidance=1.0, seed=0)
    assert res.trajectory.shape == (3, 2) and torch.isfinite(res.trajectory).all()
    assert (res.trajectory[-1] > res.trajectory[0]).all()


@pytest.mark.parametrize("algo", ["grpo", "nft"])
def test_one_training_step_through_the_trainer(tiny_dev, tmp_path, algo):
    from test_trainer import tiny_cfg

    from flowalign.trainer import Trainer

    t = Trainer(tiny_cfg(tiny_dev, tmp_path / "run", algorithm={"name": algo}, model__resolution=32,
                         sample__guidance=3.5, sample__num_steps=3, train__iterations=1, train__updates_per_iter=1))
    before = {k: v.detach().clone() for k, v in t.trainable_state().items()}
    traj, rew, groups = t.collect(0)
    adv, _ = t.advantages(rew["reward"], groups)
    rec = t.train_on(traj, adv, 0)
    after = t.trainable_state()
    assert any((after[k] - before[k]).abs().max() > 0 for k in before), rec
    if algo == "grpo":
        assert rec["onpolicy_ratio_dev"] < 1e-5
