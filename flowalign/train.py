"""Training entry point: ``accelerate launch flowalign/train.py --config configs/X.yaml [section.key=value ...]``.
``flowalign train --config ...`` runs the same code in one process."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="flowalign train", description="Fine-tune a diffusers model by reward.")
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.iterations=10")
    args = ap.parse_args(argv)
    from flowalign.cli import run_guarded
    from flowalign.config import load_config
    from flowalign.trainer import Trainer

    def go():
        Trainer(load_config(args.config, args.overrides)).run()
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
