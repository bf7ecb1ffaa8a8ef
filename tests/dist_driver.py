"""Run ``train.train`` under torchrun for the sharding tests, optionally dying at a step like a killed job.

    torchrun --nproc_per_node 2 tests/dist_driver.py OUT_DIR [--kill-at STEP] [--resume] [key.sub=value ...]
    torchrun --nproc_per_node 2 tests/dist_driver.py OUT_DIR --cache-from TEACHER_DIR

``--kill-at`` ends every process with ``os._exit`` right after that optimizer step (no cleanup, no
checkpoint of that step): what a SIGKILL of the job leaves behind. ``--cache-from`` writes a teacher cache of
``cache_rows()`` rows with that teacher instead of training (every process its shards).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from aetheris.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]


def cache_stream(vocab_size: int):
    """A deterministic stream of rows (random documents in two languages) for the teacher-cache tests."""
    import numpy as np

    from aetheris.data import PackedStream

    rng = np.random.default_rng(0)
    docs = {lang: [rng.integers(1, vocab_size, int(rng.integers(5, 40))).tolist() for _ in range(30)] for lang in ("en", "sw")}
    return PackedStream(docs, 32, seed=0)


CACHE_ARGS = {"rows": 10, "k": 8, "batch_size": 2, "shard_rows": 3}


def write_test_cache(teacher_dir: str, out: str, rank: int = 0, world: int = 1, barrier=None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from aetheris.teacher_cache import write_cache

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    heldout = {"en": torch.arange(64).view(2, 32) % teacher.config.vocab_size}
    write_cache(teacher, cache_stream(teacher.config.vocab_size), out, **CACHE_ARGS, heldout=heldout,
                source={"test": True}, rank=rank, world=world, barrier=barrier)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--cache-from", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    if args.cache_from:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        write_test_cache(args.cache_from, args.out_dir, dist.get_rank(), dist.get_world_size(), dist.barrier)
        dist.destroy_process_group()
        return
    cfg = load_config(ROOT / "configs" / "tiny-test.yaml", [f"train.out_dir={args.out_dir}", *args.overrides])

    def die(record):
        if record["step"] == args.kill_at:
            os._exit(9)

    train(cfg, hooks=[die] if args.kill_at else [], resume=True if args.resume else None)


if __name__ == "__main__":
    main()
