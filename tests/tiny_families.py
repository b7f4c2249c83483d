"""Builders of tiny random FLUX.1, SD1.5 and SDXL pipelines, saved with ``save_pretrained`` in the real diffusers
layout (as diffusers keeps ``get_dummy_components`` in its tests): real CLIP tokenizers (offline BPE on the
ShapeWorld words), a real T5 tokenizer (an offline unigram model), random weights. Test-only."""
from __future__ import annotations

import os

import torch


def clip_tokenizer(directory):
    from flowalign.shapeworld.tokenizer import write_tokenizer

    return write_tokenizer(os.path.join(str(directory), "_tok"))


def t5_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from flowalign.shapeworld.world import WORDS

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(WORDS))]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                        model_max_length=16)
    d = os.path.join(str(directory), "_t5tok")
    t.save_pretrained(d)
    return T5TokenizerFast.from_pretrained(d)


def tiny_vae(latent_channels: int = 4, **cfg):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=32)
    vae.register_to_config(**cfg)
    return vae


def clip_text(tok, projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length, projection_dim=hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def ddpm_scheduler_config(prediction_type: str = "epsilon"):
    """The SD1.5 / SDXL checkpoints' scheduler settings (scaled-linear betas, leading spacing, no clipping)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type)


def build_tiny_sd15(directory, seed: int = 0, prediction_type: str = "epsilon"):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = clip_tokenizer(directory)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=tiny_vae(scaling_factor=1.5), text_encoder=clip_text(tok), tokenizer=tok,
                                   unet=unet, scheduler=ddpm_scheduler_config(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(directory))
    return str(directory)


def build_tiny_sdxl(directory, seed: int = 0, prediction_type: str = "epsilon"):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = clip_tokenizer(directory)
    te1, te2 = clip_text(tok, hidden=16), clip_text(tok, projection=True, hidden=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(scaling_factor=1.5), text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=ddpm_scheduler_config(prediction_type),
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(directory))
    return str(directory)


def build_tiny_flux(directory, seed: int = 0, guidance_embeds: bool = True, t5: bool = True):
    """guidance_embeds True: FLUX.1-dev's layout (distilled guidance embedding); False: schnell's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = clip_tokenizer(directory)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8])
    t5tok = t5_tokenizer(directory) if t5 else None
    t5enc = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval() if t5 else None
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                          max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=sch, vae=tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=clip_text(tok), tokenizer=tok, text_encoder_2=t5enc, tokenizer_2=t5tok,
                        transformer=tr)
    pipe.save_pretrained(str(directory))
    return str(directory)
