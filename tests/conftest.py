import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def build_tiny_sd3(directory, seed: int = 0):
    """A tiny randomly initialised SD3 pipeline (same architecture as the shipped model), saved with
    save_pretrained in the real diffusers layout."""
    from flowalign.shapeworld.pretrain import Recipe, build_pipeline
    from flowalign.shapeworld.tokenizer import write_tokenizer
    from diffusers import AutoencoderKL

    r = Recipe(seed=seed, layers=1, heads=2, head_dim=16)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)  # SD3 VAEs carry both
    tok = write_tokenizer(os.path.join(directory, "_tok"))
    pipe = build_pipeline(r, vae, tok)
    pipe.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture()
def tiny_adapter(tiny_sd3):
    from flowalign.pipelines.sd3 import SD3Adapter

    return SD3Adapter.from_pretrained(tiny_sd3)
