"""Progress bars in a log file: whole lines, ~10 % apart (or a minute apart), never carriage returns."""

from __future__ import annotations

import io
from pathlib import Path

import aetheris.progress as progress
from aetheris.progress import LineProgress, progress_bar

ROOT = Path(__file__).resolve().parents[1]


def test_a_log_stream_gets_one_line_per_tenth():
    log = io.StringIO()
    bar = progress_bar(total=1000, desc="train", file=log)
    assert isinstance(bar, LineProgress)  # StringIO is not a terminal
    for i in range(1000):
        bar.set_postfix(loss=f"{1000 - i:.1f}")  # as the training loop does: postfix, then update
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 11  # the start, then 10 %, 20 %, ... 100 %
    assert [line.split()[2] for line in lines] == [f"{n}/1000" for n in range(0, 1001, 100)]
    assert lines[-1].startswith("train: 100%") and "loss=1.0" in lines[-1]


def test_the_final_count_is_written_when_it_falls_between_tenths():
    log = io.StringIO()
    bar = progress_bar(total=40, desc="eval", file=log, unit="ex")
    bar.update(16)  # batch of 16: 40 %
    bar.update(16)  # 80 %
    bar.update(8)   # 100 %, and close must not repeat it
    bar.close()
    counts = [line.split()[2] for line in log.getvalue().splitlines()]
    assert counts == ["0/40", "16/40", "32/40", "40/40"]
    log = io.StringIO()
    bar = progress_bar(total=1000, desc="stopped", file=log)
    bar.update(950)
    bar.update(5)  # not a new tenth: no line, until close writes where it stopped
    bar.close()
    assert log.getvalue().splitlines()[-1].split()[2] == "955/1000"


def test_slow_progress_still_writes_a_line_per_interval(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    bar = progress_bar(total=10_000, desc="slow", file=log, every_seconds=30)
    for _ in range(5):  # 5 steps, far below 10 %, 31 s apart
        clock[0] += 31
        bar.update(1)
    assert len(log.getvalue().splitlines()) == 6
    bar.update(1)  # same instant: nothing new
    assert len(log.getvalue().splitlines()) == 6
    bar.close()


def test_disabled_and_terminal_bars():
    log = io.StringIO()
    bar = progress_bar(total=10, desc="off", file=log, disable=True)
    bar.update(5)
    bar.close()
    assert log.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = progress_bar(total=10, desc="live", file=tty)
    assert not isinstance(bar, LineProgress)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert "\r" in tty.getvalue()  # tqdm's own live bar


def test_training_into_a_log_file_writes_readable_lines(tmp_path, capfd):
    """The training loop's bar, stderr captured to a file (not a terminal): one line per 10 % of 20 steps."""
    from aetheris.train import load_config, train

    cfg = load_config(ROOT / "configs" / "tiny-test.yaml",
                      [f"train.out_dir={tmp_path / 'run'}", "train.progress=true", "train.max_steps=20",
                       "train.eval_every=100", "train.checkpoint_every=100"])
    train(cfg)
    err = capfd.readouterr().err
    bar_lines = [line for line in err.splitlines() if line.startswith("train:")]
    assert "\r" not in err
    assert [line.split()[2] for line in bar_lines] == [f"{n}/20" for n in range(0, 21, 2)]
