"""The training loop: loss falls, resume == uninterrupted (bitwise), 2 processes == 1, packed == unpacked,
corrupt checkpoints rejected with a fallback, NaN stops the run with the last good checkpoint intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from aetheris.config_io import ConfigError
from aetheris.train import (
    CheckpointError,
    NonFiniteLossError,
    find_resume_checkpoint,
    list_checkpoints,
    lm_loss,
    load_config,
    lr_at,
    train,
    verify_checkpoint,
)

TINY = ROOT / "configs" / "tiny-test.yaml"


def tiny(tmp_path, name, *overrides):
    return load_config(TINY, [f"train.out_dir={tmp_path / name}", *overrides])


class Killed(Exception):
    pass


def kill_at(step):
    def hook(record):
        if record["step"] == step:
            raise Killed(f"simulated kill at step {step}")
    return hook


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 20-step run, shared by the tests below."""
    return train(tiny(tmp_path_factory.mktemp("runs"), "full", "train.checkpoint_every=5"))


def test_twenty_steps_lower_the_loss(full_run):
    val = full_run.val_history
    assert val[0]["step"] == 0 and val[-1]["step"] == 20
    assert val[-1]["mean"] < val[0]["mean"] - 0.2  # held-out loss, same rows at both ends
    # (The training loss itself is noisy at this size: rows of Hindi or Chinese cost more bytes per token.)
    assert len(full_run.history[-1]["expert_load"]) == 1  # one MoE layer, loads logged per expert
    assert full_run.history[-1]["tokens_per_s"] > 0


def test_kill_and_resume_gives_bitwise_the_same_weights(full_run, tmp_path):
    cfg = tiny(tmp_path, "resumed", "train.checkpoint_every=5")
    with pytest.raises(Killed):
        train(cfg, hooks=[kill_at(13)])  # dies after the step-10 checkpoint, mid-interval
    assert [p.name for p in list_checkpoints(Path(cfg.train.out_dir) / "checkpoints")][-1] == "step-0000010"
    resumed = train(cfg, resume=True)
    assert resumed.step == 20
    a, b = full_run.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    full_losses = {r["step"]: r["loss"] for r in full_run.history}
    for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["loss"] == full_losses[record["step"]]


def test_corrupt_or_partial_checkpoints_are_rejected_and_resume_falls_back(full_run, tmp_path):
    import shutil

    root = tmp_path / "ckpts"
    shutil.copytree(full_run.out_dir / "checkpoints", root)
    good, newest = list_checkpoints(root)[-2:]
    verify_checkpoint(newest)
    # A kill mid-write leaves a temp folder: never picked.
    (root / ".tmp-step-0000025-deadbeef").mkdir()
    # Truncate the newest model file (a torn write / disk trouble).
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt: model/model.safetensors has 100 bytes"):
        verify_checkpoint(newest)
    warnings = []
    assert find_resume_checkpoint(root, log=warnings.append) == good
    assert "falling back" in warnings[0] and newest.name in warnings[0]
    # Same size, flipped bytes: caught by the checksum.
    opt = good / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[-20] ^= 0xFF
    opt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt does not match its checksum"):
        verify_checkpoint(good)
    (list_checkpoints(root)[0] / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: manifest.json is missing"):
        verify_checkpoint(list_checkpoints(root)[0])
    # Asked for explicitly, a corrupt checkpoint is an error, not a silent fresh start.
    cfg = tiny(tmp_path, "explicit")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(cfg, resume=newest)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "nan", "train.checkpoint_every=3", "train.max_steps=10")
    calls = {"n": 0}

    def exploding(model, batch):
        calls["n"] += 1
        loss, metrics = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), metrics

    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 5.*step-0000003"):
        train(cfg, loss_fn=exploding)
    root = Path(cfg.train.out_dir) / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-0000003"]
    verify_checkpoint(root / "step-0000003")


def test_packed_and_unpacked_documents_give_equal_per_document_loss(tiny_tokenizer):
    from aetheris.data import PackedStream, tokenize_documents
    from aetheris.sources import Document
    from aetheris.model import Aetheris

    cfg = load_config(TINY, [f"model.vocab_size={len(tiny_tokenizer)}"])
    torch.manual_seed(0)
    model = Aetheris(cfg.model).eval()
    texts = ["Habari ya asubuhi, rafiki yangu.", "Bonjour tout le monde", "你好，世界。今天天气很好。"]
    docs = tokenize_documents([Document(t, "xx", str(i)) for i, t in enumerate(texts)], tiny_tokenizer)
    total = sum(map(len, docs))

    def per_doc_losses(batch):
        batch = {k: torch.as_tensor(v) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none")
        ce = ce.view(batch["labels"].shape[0], -1)                     # (R, T-1)
        out = []
        for r in range(len(ce)):
            valid = batch["labels"][r, 1:] != -100
            target_doc = batch["doc_ids"][r, 1:]
            for d in target_doc[valid].unique().tolist():
                out.append(ce[r][valid & (target_doc == d)].mean())
        return torch.stack(out)

    packed = PackedStream({"xx": docs}, seq_len=total, pack=True, shuffle=False)  # documents in order
    unpacked = PackedStream({"xx": docs}, seq_len=max(map(len, docs)), pack=False, shuffle=False)
    row = packed.next_row()
    assert len(set(row["doc_ids"].tolist())) == 3  # all three documents in one row
    a = per_doc_losses({k: v[None] for k, v in row.items()})
    b = per_doc_losses(unpacked.next_batch(3))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lr_schedules():
    t = load_config(TINY, ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1"]).train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(99, t) == pytest.approx(0.1, abs=1e-3)
    cosine = [lr_at(s, t) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    t.schedule, t.decay_fraction = "wsd", 0.2
    assert lr_at(50, t) == 1.0 and lr_at(79, t) == 1.0
    assert lr_at(99, t) == pytest.approx(0.1) and 0.1 < lr_at(90, t) < 1.0


def test_cli_errors_speak_to_the_user(tmp_path, capsys):
    from aetheris.cli import main

    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(TINY, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(TINY, ["train.lr=fast"])
    assert main(["train", "--config", str(TINY), "train.lr_warmup=3"]) == 2
    assert "did you mean 'train.warmup_steps'" in capsys.readouterr().err


def _run_cli(out_dir, nproc, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(29500 + nproc + os.getpid() % 500)] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "aetheris.cli", "train", "--config", str(TINY), f"train.out_dir={out_dir}",
           "train.max_steps=6", "train.eval_every=100", "train.threads=1", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two torchrun launches (~33 s measured on 2 cores)
def test_two_process_torchrun_matches_one_process(tmp_path):
    one = _run_cli(tmp_path / "one", 1, "train.micro_batch_size=4", "train.grad_accum=2")
    two = _run_cli(tmp_path / "two", 2, "train.micro_batch_size=4", "train.grad_accum=1")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
