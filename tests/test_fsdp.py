"""Sharded training (train.fsdp: torch FSDP2 ``fully_shard``) under torchrun with 2 CPU processes (gloo).

2 sharded processes == 1 process with grad_accum 2 (per-step loss within 1e-5 relative, final weights within
1e-5); a sharded run killed mid-way and resumed == uninterrupted, bitwise; its checkpoint resumed by a single
unsharded process (the supported reshard: checkpoints hold whole tensors) == uninterrupted within 1e-6; the
checkpoint's model/ folder loads with ``AutoModelForCausalLM``; an unsharded checkpoint is refused by a sharded
resume with a one-line error, the checkpoint left untouched; stage 2 sharded == stage 2 in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_process_group
sys.path.insert(0, str(ROOT / "tests"))
from test_distill_kl import _torchrun_kl, start_student  # noqa: E402,F401  (start_student: a fixture)
from test_distill_kl import _weights as _kl_weights  # noqa: E402

COMMON = ["train.max_steps=6", "train.micro_batch_size=4", "train.checkpoint_every=2", "train.eval_every=100",
          "train.threads=1"]
pytestmark = pytest.mark.slow  # five launches of torchrun / python: about a minute and a half on 2 cores


def _launch(nproc: int, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return run_process_group([*launcher, str(ROOT / "tests" / "dist_driver.py"), str(out), *COMMON, *args], env=env)


def _run(nproc: int, out: Path, *args: str) -> list[dict]:
    proc = _launch(nproc, out, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path, step: int = 6) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:07d}" / "model" / "model.safetensors"))


def test_two_sharded_processes_match_one_and_resume_anywhere(tmp_path):
    one = _run(1, tmp_path / "one", "train.grad_accum=2")
    two = _run(2, tmp_path / "two", "train.fsdp=true")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-5, msg=name)

    # Killed after step 5 (the last checkpoint is step 4), resumed with 2 sharded processes: bitwise the same.
    killed = tmp_path / "killed"
    assert _launch(2, killed, "train.fsdp=true", "--kill-at", "5").returncode != 0
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    shutil.copytree(killed, tmp_path / "killed-copy")
    _run(2, killed, "train.fsdp=true", "--resume")
    for name, value in _weights(killed).items():
        assert torch.equal(value, w2[name]), name

    # The same sharded checkpoint resumed by one unsharded process (same global batch via grad_accum 2).
    _run(1, tmp_path / "killed-copy", "train.grad_accum=2", "--resume")
    for name, value in _weights(tmp_path / "killed-copy").items():
        torch.testing.assert_close(value, w2[name], rtol=1e-6, atol=1e-6, msg=name)

    # The checkpoint's model/ folder is an ordinary checkpoint: transformers loads it once aetheris is imported.
    import aetheris  # noqa: F401  (registers the model with the Auto classes)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "checkpoints" / "step-0000006" / "model")
    loaded = {"model." + k: v for k, v in hf.model.state_dict().items()}
    for name in w2:
        assert torch.equal(loaded[name], w2[name]), name

    # An unsharded run's checkpoint holds optimizer state by index: a sharded resume refuses it in one line.
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "one" / "checkpoints").rglob("*"))
    proc = _launch(2, tmp_path / "one", "train.fsdp=true", "--resume")
    assert proc.returncode != 0
    assert "was written without train.fsdp" in proc.stderr and "train.fsdp=false" in proc.stderr
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "one" / "checkpoints").rglob("*")) == before


def test_two_sharded_processes_run_stage2_as_one(teacher_dir, start_student, tmp_path):
    """Stage 2 (online KD with group-DRO) under kl.train.fsdp with 2 processes == 1 process with grad_accum 2,
    and the student it writes (gathered from the shards) holds the same weights."""
    one, _ = _torchrun_kl(tmp_path / "one", 1, teacher_dir, start_student, "kl.train.micro_batch_size=2",
                          "kl.train.grad_accum=2")
    two, report = _torchrun_kl(tmp_path / "two", 2, teacher_dir, start_student, "kl.train.micro_batch_size=2",
                               "kl.train.grad_accum=1", "kl.train.fsdp=true")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["dro_weights"] == pytest.approx(a["dro_weights"], rel=1e-5)
    assert report["dro_weights_rank_spread"] == 0.0
    wa, wb = _kl_weights(tmp_path / "one"), _kl_weights(tmp_path / "two")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)
