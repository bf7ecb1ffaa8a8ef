"""Nothing lost: a run owns its folder (a new run refuses another run's checkpoints; cleanup touches only this
run's older ones; rejected checkpoints are moved aside; --resume with nothing that verifies stops), SIGTERM /
SIGINT finish the step and checkpoint (in-process, in a subprocess, under torchrun), every expected failure is
one line with a documented exit code (config 2, NaN 3, disk full / read-only 4), configs are refused before
anything loads, and a resume into a different model names the difference."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aetheris.cli import main
from aetheris.runs import Interrupted, RunFolderError, RunIOError, SignalGuard
from aetheris.train import CheckpointError, list_checkpoints, load_config, train, verify_checkpoint

from conftest import ROOT
TINY = ROOT / "configs" / "tiny-test.yaml"


def tiny(out_dir, *overrides):
    return load_config(TINY, [f"train.out_dir={out_dir}", "train.eval_every=100", "train.threads=1", *overrides])


def cli(capsys, *argv) -> tuple[int, list[str]]:
    """Run ``aetheris`` in-process; the exit code and the lines it printed on stderr."""
    capsys.readouterr()  # only this command's output
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def train_cli(capsys, out_dir, *overrides):
    return cli(capsys, "train", "--config", TINY, f"train.out_dir={out_dir}", "train.eval_every=100",
               "train.threads=1", *overrides)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_data_load(monkeypatch):
    """Fail loudly if the run gets as far as reading data: the error must come before."""
    def boom(*args, **kwargs):
        raise AssertionError("data was loaded before the error")
    monkeypatch.setattr("aetheris.train_data.load_documents", boom)


# --- 1. a run owns its folder -------------------------------------------------------------------


def test_a_new_run_refuses_a_folder_holding_checkpoints_and_overwrite_starts_over(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=6", "train.checkpoint_every=3"))
    before = files_of(out)
    with monkeypatch.context() as m:
        no_data_load(m)
        code, err = train_cli(capsys, out, "train.max_steps=4")
        assert code == 2 and len(err) == 1, err
        assert "already holds 2 checkpoint(s)" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
        code, err = train_cli(capsys, out, "--resume", "--overwrite")
        assert code == 2 and "contradict" in err[0]
    assert files_of(out) == before  # nothing touched
    # --overwrite: the old run's checkpoints go; the new run's final checkpoint is the one it names, and it exists.
    result = train(tiny(out, "train.max_steps=4", "train.checkpoint_every=2"), overwrite=True)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000004"]
    assert result.last_checkpoint == out / "checkpoints" / "step-0000004"
    verify_checkpoint(result.last_checkpoint)


def test_cleanup_removes_only_this_runs_older_checkpoints(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    train(tiny(out, "train.max_steps=6", "train.checkpoint_every=3", "train.keep_last=2"))
    # A checkpoint another run left here (its own run_id) is never pruned.
    foreign = root / "step-0000001"
    shutil.copytree(root / "step-0000003", foreign)
    state = json.loads((foreign / "state.json").read_text())
    (foreign / "state.json").write_text(json.dumps({**state, "run_id": "another-run"}))
    # Resume from the older step 3 (explicitly) and run to 12: step 6 is re-written (the earlier step 6 is
    # moved aside, not deleted), then 9 and 12; cleanup keeps this run's newest two, and the foreign one.
    result = train(tiny(out, "train.max_steps=12", "train.checkpoint_every=3", "train.keep_last=2"),
                   resume=root / "step-0000003")
    assert [p.name for p in list_checkpoints(root)] == ["step-0000001", "step-0000009", "step-0000012"]
    assert sorted(p.name for p in (root / "rejected").iterdir()) == ["rejected.jsonl", "step-0000006"]
    assert result.last_checkpoint == root / "step-0000012" and result.last_checkpoint.is_dir()


def test_rejected_checkpoints_are_moved_aside_never_deleted(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    train(tiny(out, "train.max_steps=6", "train.checkpoint_every=3"))
    weights = root / "step-0000006" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a torn write
    (root / "step-0000009").write_text("not a checkpoint")  # a file where a step folder belongs
    logs = []
    result = train(tiny(out, "train.max_steps=9", "train.checkpoint_every=3"), resume=True)
    assert result.step == 9
    rejected = root / "rejected"
    assert sorted(p.name for p in rejected.iterdir()) == ["rejected.jsonl", "step-0000006", "step-0000009"]
    assert (rejected / "step-0000009").read_text() == "not a checkpoint"  # kept as it was
    assert len((rejected / "step-0000006" / "model" / "model.safetensors").read_bytes()) == 100
    reasons = {r["entry"]: r["reason"] for r in map(json.loads, (rejected / "rejected.jsonl").read_text().splitlines())}
    assert "not a folder" in reasons["step-0000009"] and "corrupt" in reasons["step-0000006"]
    assert [p.name for p in list_checkpoints(root)] == ["step-0000006", "step-0000009"]  # resumed from 3, rewritten
    for p in list_checkpoints(root):
        verify_checkpoint(p)
    assert not list(root.glob(".tmp-*")) and not logs


def test_resume_with_checkpoints_none_of_which_verifies_stops_and_changes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=6", "train.checkpoint_every=3"))
    for manifest in (out / "checkpoints").glob("step-*/manifest.json"):
        manifest.unlink()
    before = files_of(out)
    no_data_load(monkeypatch)
    code, err = train_cli(capsys, out, "train.max_steps=6", "train.checkpoint_every=3", "--resume")
    assert code == 2 and len(err) == 1, err
    assert "found 2 checkpoint(s)" in err[0] and "none verifies" in err[0] and "--overwrite" in err[0]
    assert files_of(out) == before  # metrics.jsonl and the step folders as they were: no silent restart


# --- 2. signals ---------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_checkpoints_and_resume_is_exact(tmp_path):
    steps = ("train.max_steps=8", "train.checkpoint_every=100")
    full = train(tiny(tmp_path / "full", *steps))

    def sigterm_at_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, mid-run

    cfg = tiny(tmp_path / "sig", *steps)
    with pytest.raises(Interrupted) as info:
        train(cfg, hooks=[sigterm_at_3])
    stop = info.value
    assert (stop.signum, stop.step, stop.exit_code) == (signal.SIGTERM, 3, 143)
    assert stop.checkpoint == tmp_path / "sig" / "checkpoints" / "step-0000003"
    verify_checkpoint(stop.checkpoint)
    assert str(stop) == f"stopped by SIGTERM after step 3; checkpoint {stop.checkpoint}; continue with --resume"
    resumed = train(cfg, resume=True)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_second_signal_stops_at_once_a_duplicate_does_not():
    def deliver(signum):
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode

    guard = SignalGuard(window=0.0)
    assert guard.install()
    try:
        guard.armed = True
        deliver(signal.SIGINT)
        assert guard.signum == signal.SIGINT and guard.requested() == signal.SIGINT  # recorded, no exception
        with pytest.raises(Interrupted) as info:
            deliver(signal.SIGINT)
        assert info.value.at_once and info.value.exit_code == 130
    finally:
        guard.uninstall()
    guard = SignalGuard(window=60.0)  # a process group signal + torchrun forwarding it: one request
    guard.install()
    try:
        guard.armed = True
        deliver(signal.SIGTERM)
        deliver(signal.SIGTERM)
        assert guard.signum == signal.SIGTERM
        guard.armed = False  # outside the loop there is nothing to save: stop at once
        guard.signum = None
        with pytest.raises(Interrupted) as info:
            deliver(signal.SIGTERM)
        assert info.value.step is None and info.value.exit_code == 143
    finally:
        guard.uninstall()


def _metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _signal_when(proc, out: Path, past_step: int, send, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (_metrics_steps(out) and _metrics_steps(out)[-1] > past_step):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_all(proc)
            raise AssertionError(f"the run ended or stalled before step {past_step + 1}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    send()


def _kill_all(proc) -> None:
    """SIGKILL the launched process and its workers (torchrun starts each worker in a session of its own)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    pids = list(map(int, children.read_text().split())) if children.exists() else []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(proc, timeout: float) -> str:
    """stderr of the finished process; on a hang, its whole process group is killed (no stray workers)."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        _kill_all(proc)
        raise AssertionError(f"no exit within {timeout} s: {proc.communicate()[1][-3000:]}") from None


def _launch(out: Path, *extra, nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "aetheris.cli", "train", "--config", str(TINY), f"train.out_dir={out}",
           "train.max_steps=100000", "train.checkpoint_every=100000", "train.eval_every=100000", "train.log_every=1",
           "train.threads=1", "train.micro_batch_size=4", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group (torchrun's workers too)


def _stop_cli_with(tmp_path, signum, code) -> None:
    out = tmp_path / "run"
    proc = _launch(out)
    _signal_when(proc, out, 1, lambda: proc.send_signal(signum))
    err = _finish(proc, 120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    step = _metrics_steps(out)[-1]
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (f"aetheris train: stopped: stopped by {name} after step {step}; "
                                            f"checkpoint {ckpt}; continue with --resume")
    verify_checkpoint(ckpt)
    assert json.loads((ckpt / "state.json").read_text())["step"] == step >= 2


def test_cli_stops_on_sigterm_with_a_checkpoint_exit_143_and_one_line(tmp_path):
    _stop_cli_with(tmp_path, signal.SIGTERM, 143)


@pytest.mark.slow
def test_cli_stops_on_sigint_with_a_checkpoint_exit_130_and_one_line(tmp_path):
    _stop_cli_with(tmp_path, signal.SIGINT, 130)


def _worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with ``RANK=rank`` (from /proc: its children and their environments)."""
    for _ in range(200):
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
        for pid in map(int, children):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_torchrun_ranks_agree_on_the_step_they_stop_at(tmp_path):
    """SIGTERM to rank 1 only: rank 0 never sees a signal, yet stops after the same step (the flag is all-reduced
    every step), so the checkpoint barrier and the collectives line up, rank 0 writes the checkpoint and says so."""
    out = tmp_path / "run"
    proc = _launch(out, nproc=2)
    _signal_when(proc, out, 2, lambda: os.kill(_worker_of_rank(proc.pid, 1), signal.SIGTERM))
    err = _finish(proc, 180)
    found = re.findall(r"aetheris train: stopped: stopped by SIGTERM after step (\d+)", err)
    assert len(found) == 1, err[-4000:]  # printed once, by rank 0
    step = int(found[0])
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    verify_checkpoint(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == step == _metrics_steps(out)[-1]


# --- 3. one line per failure ----------------------------------------------------------------------


def test_disk_full_while_writing_a_checkpoint_is_one_line_exit_4_and_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    """A patched write that fills the disk halfway through the second checkpoint's weights."""
    import aetheris.checkpoint as ckpt_module

    real, calls = ckpt_module.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_module, "save_file", save_file)
    out = tmp_path / "run"
    code, err = train_cli(capsys, out, "train.max_steps=6", "train.checkpoint_every=3")
    assert code == 4 and len(err) == 1, err  # (progress lines go to stdout)
    assert err[0].startswith("aetheris train: error: could not write checkpoint step-0000006: no space left on the device")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000003"]
    verify_checkpoint(out / "checkpoints" / "step-0000003")
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2.8 MB file system (room for one tiny-test checkpoint, not two); needs root to mount."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2800k", "tmpfs", str(mnt)],
                                          capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the patched-write test covers disk-full without it)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_really_full_disk_is_one_line_exit_4(small_tmpfs, capsys):
    out = small_tmpfs / "run"
    code, err = train_cli(capsys, out, "train.max_steps=6", "train.checkpoint_every=3")
    assert code == 4 and "Traceback" not in "\n".join(err), err
    assert "could not write checkpoint step-0000006: no space left on the device" in err[-1]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000003"]
    verify_checkpoint(out / "checkpoints" / "step-0000003")
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.fixture
def read_only_checkpoints(tmp_path):
    """``out/checkpoints`` that cannot be written: chmod for a normal user, a read-only mount for root."""
    out = tmp_path / "run"
    folder = out / "checkpoints"
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield out
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("root, but cannot mount a read-only tmpfs here")
    try:
        yield out
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_read_only_checkpoints_folder_is_one_line_exit_4_before_data_loads(read_only_checkpoints, capsys, monkeypatch):
    no_data_load(monkeypatch)
    code, err = train_cli(capsys, read_only_checkpoints)
    assert code == 4 and len(err) == 1, err
    assert "is not writable" in err[0] and "choose another out_dir" in err[0]


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    no_data_load(monkeypatch)
    code, err = train_cli(capsys, tmp_path / "run", "train.lr=-1", "--debug")
    assert code == 2 and err[0].startswith("Traceback") and err[-1].startswith("aetheris train: error:")
    monkeypatch.setenv("AETHERIS_DEBUG", "1")
    code, err = train_cli(capsys, tmp_path / "run", "train.lr=-1")
    assert code == 2 and err[0].startswith("Traceback")


def test_eval_compare_serve_fail_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    for argv in (("eval", "--model", missing, "--output", tmp_path / "e", "--tasks", "ppl"),
                 ("compare", "--teacher", missing, "--student", missing, "--output", tmp_path / "c"),
                 ("serve", "--model", missing)):
        code, err = cli(capsys, *argv)
        assert code == 2 and len(err) == 1 and err[0].startswith(f"aetheris {argv[0]}: error: ") and str(missing) in err[0], err


def test_serve_on_a_port_in_use_fails_in_one_line(tiny_tokenizer, tmp_path, capsys):
    import socket

    from serve_helpers import tiny_checkpoint

    model = tiny_checkpoint(tiny_tokenizer, tmp_path / "model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = cli(capsys, "serve", "--model", model, "--port", port)
    assert code == 2 and len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0] and "--port" in err[0], err


# --- 4. configs checked before anything loads -------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1e-3", "train.lr=-0.001 must be a number > 0"),
    ("train.warmup_steps=-5", "train.warmup_steps=-5 must be an integer >= 0"),
    ("data.languages=5", "data.languages=5: give 'all' or a list of language codes"),
    ("train.max_steps=2.5", "train.max_steps=2.5 must be an integer"),
    ("train.beta2=1.5", "train.beta2=1.5 must be in [0, 1)"),
    ("data.val_fraction=0", "data.val_fraction=0.0 must be in (0, 1)"),
    ("train.micro_batch_size=[1,2]", "train.micro_batch_size=[1, 2] must be a single int"),
])
def test_bad_values_are_refused_by_key_before_anything_loads(override, message, tmp_path, capsys, monkeypatch):
    no_data_load(monkeypatch)
    code, err = train_cli(capsys, tmp_path / "run", override)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"aetheris train: error: {message}"), err


def test_repeated_override_keys_are_refused(tmp_path, capsys, monkeypatch):
    no_data_load(monkeypatch)
    code, err = train_cli(capsys, tmp_path / "run", "train.max_steps=3", "train.max_steps=5")
    assert code == 2 and err == ["aetheris train: error: train.max_steps is set twice ('train.max_steps=3' and "
                                 "'train.max_steps=5'): keep one"]


def test_run_dir_and_a_stage_out_dir_conflict(tmp_path, capsys):
    from aetheris.config_io import ConfigError
    from aetheris.distill import load_distill_config

    config = ROOT / "configs" / "nano-distill.yaml"
    with pytest.raises(ConfigError, match=r"kl.train.out_dir=.*B conflicts with run_dir=.*A"):
        load_distill_config(config, [f"run_dir={tmp_path / 'A'}", f"kl.train.out_dir={tmp_path / 'B'}"])
    agreed = load_distill_config(config, [f"run_dir={tmp_path / 'A'}", f"kl.train.out_dir={tmp_path / 'A' / 'kl'}"])
    assert agreed.kl.train.out_dir == str(tmp_path / "A" / "kl")
    alone = load_distill_config(config, ["run_dir=null", f"kl.train.out_dir={tmp_path / 'B'}"])
    assert alone.kl.train.out_dir == str(tmp_path / "B")
    code, err = cli(capsys, "distill", "--config", config, "--stages", "kl", f"run_dir={tmp_path / 'A'}",
                    f"kl.train.out_dir={tmp_path / 'B'}")
    assert code == 2 and len(err) == 1 and "conflicts with run_dir" in err[0]


def test_resume_into_a_different_model_names_the_difference_before_data_loads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=3", "train.checkpoint_every=3"))
    no_data_load(monkeypatch)
    with pytest.raises(CheckpointError, match=r"model.d_model: checkpoint 64, this run 96"):
        train(tiny(out, "train.max_steps=6", "model.d_model=96"), resume=True)
    code, err = train_cli(capsys, out, "model.d_model=96", "model.n_experts=2", "--resume")
    assert code == 2 and len(err) == 1
    assert "model.d_model: checkpoint 64, this run 96; model.n_experts: checkpoint 4, this run 2" in err[0]


def test_exit_codes_of_library_errors():
    from aetheris.runs import exit_code
    from aetheris.train import NonFiniteLossError

    assert exit_code(NonFiniteLossError("nan")) == 3
    assert exit_code(RunFolderError("x")) == 2 and exit_code(CheckpointError("x")) == 2
    assert exit_code(RunIOError("x")) == 4 and exit_code(OSError(errno.EROFS, "Read-only file system")) == 4
    assert exit_code(OSError("not a valid model identifier")) == 2  # transformers' message-only OSError
    assert exit_code(Interrupted(signal.SIGINT, None, 3)) == 130
    assert exit_code(RuntimeError("a bug")) is None  # unexpected: the traceback is shown


# --- the same in a distillation stage -------------------------------------------------------------


@pytest.fixture(scope="module")
def start_student(teacher_dir, tiny_cohere2_teacher, tiny_tokenizer, tmp_path_factory):
    """A stage-2 starting point: the student right after weight transfer from the tiny Cohere2 teacher."""
    from aetheris.checkpoint import save_model
    from aetheris.distill import build_student, load_distill_config
    from aetheris.model import Aetheris
    from aetheris.transfer import transfer

    cfg = load_distill_config(ROOT / "configs" / "nano-distill.yaml", [f"teacher.name={teacher_dir}", "student.n_pairs=2"])
    scfg, pairs = build_student(cfg, tiny_cohere2_teacher.config)
    torch.manual_seed(0)
    student = Aetheris(scfg)
    transfer(tiny_cohere2_teacher, student, pairs)
    folder = tmp_path_factory.mktemp("start") / "student"
    save_model(student, folder, tokenizer=tiny_tokenizer)
    return folder


def _kl_overrides(teacher_dir, out, init, *extra):
    return [f"teacher.name={teacher_dir}", "run_dir=null", f"kl.train.out_dir={out}", f"kl.init={init}",
            "data.languages=[en, sw]", "data.sources=[{type: corpus, max_lines_per_language: 40}]", "data.seq_len=32",
            "student.n_pairs=2", "kl.train.max_steps=6", "kl.train.micro_batch_size=2", "kl.train.log_every=1",
            "kl.train.eval_every=100", "kl.train.checkpoint_every=100", "kl.train.progress=false", "kl.train.tracker=none",
            "kl.train.threads=1", "kl.report_rows_per_language=1", "kl.chunk=16", *extra]


def test_a_distillation_stage_stops_on_sigterm_with_a_checkpoint(teacher_dir, start_student, tmp_path, capsys, monkeypatch):
    from aetheris.distill import load_distill_config, run_kl

    out = tmp_path / "kl"
    overrides = _kl_overrides(teacher_dir, out, start_student)
    cfg = load_distill_config(ROOT / "configs" / "nano-distill.yaml", overrides)

    def sigterm_at_2(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as info:
        run_kl(cfg, hooks=[sigterm_at_2], log=lambda *_: None)
    assert info.value.step == 2 and info.value.checkpoint == out / "checkpoints" / "step-0000002"
    verify_checkpoint(info.value.checkpoint)
    # The CLI refuses to start a new stage-2 run over it, before the teacher loads.
    monkeypatch.setattr("aetheris.distill.common.load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    code, err = cli(capsys, "distill", "--config", ROOT / "configs" / "nano-distill.yaml", "--stages", "kl", *overrides)
    assert code == 2 and len(err) == 1 and "already holds 1 checkpoint(s)" in err[0]


def test_a_nan_in_distillation_is_one_line_exit_3(teacher_dir, start_student, tmp_path, capsys):
    code, err = cli(capsys, "distill", "--config", ROOT / "configs" / "nano-distill.yaml", "--stages", "kl",
                    *_kl_overrides(teacher_dir, tmp_path / "kl", start_student, "kl.train.lr=1e4", "kl.train.grad_clip=0",
                                   "kl.train.warmup_steps=0"))
    assert code == 3 and "Traceback" not in "\n".join(err), err  # (above it: the teacher's loading bar)
    assert re.match(r"aetheris distill: stopped: the (loss|gradient norm) became (nan|inf) at step \d+", err[-1])
