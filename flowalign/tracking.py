"""Run logs: one JSON line per iteration in metrics.jsonl, the same scalars in TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path


class RunLogger:
    def __init__(self, out_dir, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.f = open(self.out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"))
        except ImportError:  # tensorboard is a core dependency; stay usable without it
            self.tb = None

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(k, v, rec["iteration"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()
