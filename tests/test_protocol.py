"""The algorithm protocol: moving GRPO into it kept its numbers (a golden run recorded before the refactor)."""
import json
from pathlib import Path

import pytest
import torch

from flowalign.config import load_config
from flowalign.trainer import Trainer

ROOT = Path(__file__).parent.parent
GOLDEN = ROOT / "tests" / "fixtures" / "grpo_golden.json"
KEYS = ("reward_mean", "reward_std", "policy_loss", "kl", "grad_norm", "clipfrac", "trained_frac")


def measure_grpo(out, iterations: int = 3) -> dict:
    """The shipped main GRPO config for a few iterations (evaluation shrunk: it does not touch training)."""
    cfg = load_config(ROOT / "configs" / "shapeworld_flow_grpo.yaml",
                      [f"train.iterations={iterations}", "eval.n_per_task=1", "eval.every=0", "eval.num_steps=2",
                       "run.checkpoint_every=0", f"run.output_dir={out}"])
    t = Trainer(cfg)
    base = {k: v.detach().clone() for k, v in t.trainable_state().items()}
    t.run()
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    after = t.trainable_state()
    return {"metrics": [{k: r[k] for k in KEYS if k in r} for r in recs],
            "weights": {k: [float((after[k].detach() - base[k]).double().norm()), float(after[k].detach().double().sum())]
                        for k in sorted(base)}}


@pytest.mark.slow
def test_grpo_in_the_protocol_keeps_the_numbers_of_the_pre_refactor_trainer(tmp_path):
    torch.set_num_threads(1)
    want = json.loads(GOLDEN.read_text())
    got = measure_grpo(tmp_path / "run")
    assert len(got["metrics"]) == len(want["metrics"])
    for g, w in zip(got["metrics"], want["metrics"]):
        assert set(g) == set(w)
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-7), k
    assert set(got["weights"]) == set(want["weights"])
    moved = 0
    for k, (dn, s) in want["weights"].items():
        assert got["weights"][k][0] == pytest.approx(dn, rel=1e-3, abs=1e-8), k
        assert got["weights"][k][1] == pytest.approx(s, rel=1e-4, abs=1e-5), k
        moved += dn > 0
    assert moved > len(want["weights"]) // 2  # the run really trained
