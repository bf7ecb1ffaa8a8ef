"""Run ``train.train`` under torchrun for the sharding tests, optionally dying at a step like a killed job.

    torchrun --nproc_per_node 2 tests/dist_driver.py OUT_DIR [--kill-at STEP] [--resume] [key.sub=value ...]

``--kill-at`` ends every process with ``os._exit`` right after that optimizer step (no cleanup, no
checkpoint of that step): what a SIGKILL of the job leaves behind.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from aetheris.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(ROOT / "configs" / "tiny-test.yaml", [f"train.out_dir={args.out_dir}", *args.overrides])

    def die(record):
        if record["step"] == args.kill_at:
            os._exit(9)

    train(cfg, hooks=[die] if args.kill_at else [], resume=True if args.resume else None)


if __name__ == "__main__":
    main()
