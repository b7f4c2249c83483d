"""The SD3 adapter against the stock diffusers pipeline, on a tiny random replica saved in the real layout."""
import pytest
import torch

from flowalign.pipelines.base import Cond, ModelLoadError, load_adapter
from flowalign.pipelines.sd3 import SD3Adapter
from flowalign.rollout import replay_step, rollout, sample_ode, sde_mask

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_ode_sampler_reproduces_the_stock_pipeline(tiny_adapter, guidance):
    ad = tiny_adapter
    x = ad.init_noise(2, torch.Generator().manual_seed(3))
    ours = sample_ode(ad, ad.encode(PROMPTS, negative="" if guidance > 1 else None), 6, guidance, x.clone())
    stock = ad.pipe(prompt=PROMPTS, latents=x.clone(), num_inference_steps=6, guidance_scale=guidance, height=32,
                    width=32, max_sequence_length=0, output_type="pt").images
    assert ours.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, stock.float(), atol=1e-5)


def test_init_noise_matches_the_pipeline_draw(tiny_adapter):
    from diffusers.utils.torch_utils import randn_tensor
    a = tiny_adapter.init_noise(3, torch.Generator().manual_seed(5))
    b = randn_tensor((3, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_schedule_is_the_schedulers_sigmas(tiny_adapter):
    s = tiny_adapter.schedule(10)
    assert s.shape == (11,) and s[0] == 1.0 and s[-1] == 0.0 and torch.all(s[1:] < s[:-1])


def test_on_policy_ratio_is_exactly_one(tiny_adapter):
    """Replaying stored transitions with unchanged weights gives the stored log-probs, also when the replay batch
    is a different subset/order than the rollout batch."""
    ad = tiny_adapter
    prompts = PROMPTS * 3
    sig = ad.schedule(5)
    tr = rollout(ad, ad.encode(prompts), sig, 2.0, 0.7, sde_mask(5), generator=torch.Generator().manual_seed(0),
                 prompts=prompts)
    sub = tr.index([4, 1, 2])
    with torch.no_grad():
        for i in range(4):
            lp = replay_step(ad, sub, i).log_prob
            assert (lp - sub.log_probs[:, i]).abs().max().item() < 1e-5
    assert torch.all(tr.log_probs[:, -1] == 0)  # last step ODE


def test_per_sample_mask_branches_off_the_ode_path(tiny_adapter):
    """A (B, T) mask: each sample follows the ODE path exactly except at its own stochastic step; log-probs are
    stored only there and replay to the same values."""
    ad = tiny_adapter
    sig = ad.schedule(4)
    prompts = ["a red circle", "a blue square", "a red circle", "two green crosses"]
    cond = ad.encode(prompts, negative="")
    x = ad.init_noise(1, torch.Generator().manual_seed(0)).expand(4, -1, -1, -1).clone()
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = mask[1, 2] = mask[2, 1] = True  # sample 3: pure ODE
    tr = rollout(ad, cond, sig, 2.0, 0.7, mask, x=x, generator=torch.Generator().manual_seed(1), prompts=prompts)
    ode = rollout(ad, cond, sig, 2.0, 0.7, torch.zeros(4, dtype=torch.bool), x=x, prompts=prompts)
    assert torch.equal(tr.latents[3], ode.latents[3])
    for b, k in [(0, 0), (1, 2), (2, 1)]:
        assert torch.allclose(tr.latents[b, : k + 1], ode.latents[b, : k + 1], atol=1e-6)  # same path up to k
        assert not torch.allclose(tr.latents[b, k + 1], ode.latents[b, k + 1])              # branches at k
        assert (tr.log_probs[b] != 0).tolist() == mask[b].tolist()
        sub = tr.index([b])
        assert sub.sde_mask.shape == (1, 4)
        assert torch.allclose(replay_step(ad, sub, k).log_prob, tr.log_probs[b, k:k + 1], atol=1e-5)
    assert torch.equal(tr.log_probs[3], torch.zeros(4))


def test_decode_range_and_gradient(tiny_adapter):
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    img = tiny_adapter.decode(z, differentiable=True)
    assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1
    img.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_lora_reference_kl_and_diffusers_lora_roundtrip(tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from flowalign.samplers import gaussian_kl

    ad = SD3Adapter.from_pretrained(tiny_sd3)
    params = ad.add_lora(rank=4, alpha=8)
    assert params and all(p.requires_grad for p in params)
    cond = ad.encode(PROMPTS)
    x, sig = torch.randn(2, 4, 8, 8), ad.schedule(4)
    pol, ref = ad.step(x, sig, 1, cond, 2.0, 0.7, noise=torch.zeros_like(x)), None
    with torch.no_grad(), ad.reference():
        ref = ad.step(x, sig, 1, cond, 2.0, 0.7, noise=torch.zeros_like(x))
    assert gaussian_kl(pol.mean, ref.mean, pol.std).abs().max().item() == 0.0  # LoRA B starts at zero
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    pol = ad.step(x, sig, 1, cond, 2.0, 0.7, noise=torch.zeros_like(x))
    kl = gaussian_kl(pol.mean, ref.mean, pol.std).mean()
    assert kl.item() > 0
    kl.backward()
    assert sum(p.grad.abs().sum() for p in params if p.grad is not None) > 0  # the KL term trains the policy
    ad.save_trained(tmp_path / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    xT = ad.init_noise(2, torch.Generator().manual_seed(1))
    ours = sample_ode(ad, ad.encode(PROMPTS), 4, 2.0, xT.clone())
    theirs = pipe(prompt=PROMPTS, latents=xT.clone(), num_inference_steps=4, guidance_scale=2.0, height=32, width=32,
                  max_sequence_length=0, output_type="pt").images
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_full_finetune_reference_is_a_frozen_copy(tiny_sd3):
    ad = SD3Adapter.from_pretrained(tiny_sd3)
    params = ad.full_finetune()
    ad.freeze_reference()
    with torch.no_grad():
        params[0].add_(1.0)
    cond = ad.encode(PROMPTS[:1])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), ad.reference():
        r = ad.predict(x, 0.5, cond)
    assert not torch.allclose(ad.predict(x, 0.5, cond), r)


def test_pipeline_save_load_roundtrip(tiny_adapter, tmp_path):
    tiny_adapter.pipe.save_pretrained(str(tmp_path / "copy"))
    again = load_adapter(tmp_path / "copy")
    x = torch.randn(1, 4, 8, 8)
    c1, c2 = tiny_adapter.encode(PROMPTS[:1]), again.encode(PROMPTS[:1])
    assert torch.equal(tiny_adapter.predict(x, 0.7, c1, 2.0), again.predict(x, 0.7, c2, 2.0))


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_adapter(tmp_path / "empty")


def test_cond_index_and_cat():
    c = Cond(torch.arange(6.).view(3, 2), torch.arange(3.).view(3, 1))
    assert torch.equal(Cond.cat([c.index([0]), c.index([2])]).embeds, torch.tensor([[0., 1.], [4., 5.]]))


def test_cfg_grad_cond_keeps_the_value_and_trains_only_the_conditional_branch(tiny_adapter):
    """cfg_grad='cond': the same CFG velocity, and its gradient equals guidance x the gradient of the conditional
    prediction alone (the unconditional branch is treated as a constant)."""
    ad = tiny_adapter
    params = ad.full_finetune()
    cond = ad.encode(PROMPTS, negative="")
    x = ad.init_noise(2, torch.Generator().manual_seed(0))
    g = 2.5

    def grads(fn):
        for p in params:
            p.grad = None
        fn().sum().backward()
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None])

    try:
        both = ad.predict(x, 0.6, cond, g)
        only = ad.predict(x, 0.6, cond, g, cfg_grad="cond")
        assert torch.allclose(both, only, atol=1e-5)
        g_cond = grads(lambda: ad.predict(x, 0.6, cond, g, cfg_grad="cond"))
        g_both = grads(lambda: ad.predict(x, 0.6, cond, g, cfg_grad="both"))
        g_c = grads(lambda: ad.predict(x, 0.6, Cond(cond.embeds, cond.pooled), 1.0))
    finally:
        ad.transformer.requires_grad_(False)
    assert torch.allclose(g_cond, g * g_c, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(g_both, g_cond, rtol=1e-3, atol=1e-6)


def _perturbed(tiny_sd3, lora: bool = False) -> SD3Adapter:
    """An adapter whose trainable weights (full transformer, or LoRA r4) were moved off their initial values."""
    ad = SD3Adapter.from_pretrained(tiny_sd3)
    params = ad.add_lora(rank=4, alpha=8) if lora else ad.full_finetune()
    with torch.no_grad():
        for p in params:
            p.add_((0.05 if lora else 0.02) * torch.randn_like(p))
    return ad


def test_load_trained_applies_a_full_finetune_or_lora_and_names_a_missing_dir(tiny_sd3, tmp_path):
    cond = SD3Adapter.from_pretrained(tiny_sd3).encode(PROMPTS, negative="")
    xT = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    base = sample_ode(SD3Adapter.from_pretrained(tiny_sd3), cond, 3, 2.0, xT.clone())
    for kind in ("full", "lora"):
        ad = _perturbed(tiny_sd3, lora=kind == "lora")
        ad.save_trained(tmp_path / kind)
        want = sample_ode(ad, cond, 3, 2.0, xT.clone())
        assert not torch.allclose(base, want, atol=1e-3)
        fresh = SD3Adapter.from_pretrained(tiny_sd3)
        fresh.load_trained(tmp_path / kind)
        assert torch.allclose(sample_ode(fresh, cond, 3, 2.0, xT.clone()), want, atol=1e-5), kind
    with pytest.raises(ModelLoadError, match="no trained weights in .*nothing"):
        fresh.load_trained(tmp_path / "nothing")


def test_load_trained_reads_a_full_finetune_checkpoint_and_refuses_a_lora_one(tiny_sd3, tmp_path):
    from flowalign.checkpoint import save_checkpoint

    cond = SD3Adapter.from_pretrained(tiny_sd3).encode(PROMPTS, negative="")
    xT = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for kind in ("full", "lora"):
        ad = _perturbed(tiny_sd3, lora=kind == "lora")
        trainable = {n: p for n, p in ad.transformer.named_parameters() if p.requires_grad}
        save_checkpoint(tmp_path, kind, trainable, {}, {"iteration": 2})
        if kind == "full":
            want = sample_ode(ad, cond, 3, 2.0, xT.clone())
    fresh = SD3Adapter.from_pretrained(tiny_sd3)
    fresh.load_trained(tmp_path / "full")
    assert torch.allclose(sample_ode(fresh, cond, 3, 2.0, xT.clone()), want, atol=1e-5)
    with pytest.raises(ModelLoadError, match="LoRA training checkpoint"):
        SD3Adapter.from_pretrained(tiny_sd3).load_trained(tmp_path / "lora")


def test_sd3_refuses_a_kernel_it_does_not_implement(tiny_adapter):
    """DDIM is a DDPM families' kernel: the SD3 adapter says so instead of silently running the flow SDE."""
    ad = tiny_adapter
    cond = ad.encode(["a red circle"], negative=None)
    sig = ad.schedule(2)
    x = ad.init_noise(1, torch.Generator().manual_seed(0))
    assert ad.kernels == ("sde", "cps")
    with pytest.raises(ValueError, match="unknown kernel 'ddim' for SD3"):
        ad.step(x, sig, 0, cond, 1.0, 0.5, kernel="ddim")
