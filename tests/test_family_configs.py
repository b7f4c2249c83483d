"""The model-family configs load through the validator and say what their family needs."""
from pathlib import Path

import pytest

from flowalign.config import ConfigError, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name,algo,kernel", [("sd15_ddpo", "ddpo", "ddim"), ("sdxl_ddpo", "ddpo", "ddim"),
                                              ("flux_dev_flow_grpo", "grpo", "sde")])
def test_family_config_loads(name, algo, kernel):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.algorithm.name == algo and cfg.sample.kernel == kernel
    assert cfg.model.lora.enabled and cfg.model.resolution >= 512


def test_ddim_eta_is_bounded():
    with pytest.raises(ConfigError, match="noise_level"):
        load_config(CONFIGS / "sd15_ddpo.yaml", overrides=["sample.noise_level=1.5"])
