"""A run's folder and its lifetime: who owns ``out_dir``, which checkpoint folders are kept, moved aside or
pruned, what SIGTERM / SIGINT do, and how a failure becomes one line and an exit code.

The training loop (``train.py``) writes and verifies checkpoints; this module decides what happens *around*
them, so that nothing already saved is lost:

- **Ownership.** A fresh run refuses an ``out_dir`` that already holds checkpoints unless told ``--resume``
  (continue that run) or ``--overwrite`` (start over; the old checkpoints are deleted). Every checkpoint
  records the ``run_id`` of the run that wrote it, and cleanup removes only that run's checkpoints older
  than the one just written.
- **Rejection.** A checkpoint that fails verification, or a ``step-*`` entry that is not a folder at all, is
  moved into ``checkpoints/rejected/`` with the reason logged in ``rejected/rejected.jsonl``; never deleted.
- **Signals.** ``SIGNALS`` turns SIGTERM (what a scheduler sends) and SIGINT (Ctrl-C) into a request the
  loop reads after each optimizer step (all ranks agree through an all-reduce), writes a checkpoint, and
  stops with ``Interrupted`` (exit 143 / 130). A second signal stops at once. Duplicates within
  ``window`` seconds count as one: a scheduler signalling a process group while ``torchrun`` forwards the
  same signal delivers two at the same moment.
- **Exit codes.** 2: the config or the input is wrong; 3: the loss became NaN/inf; 4: I/O (disk full,
  read-only, permission); 128 + signal number when stopped by a signal. ``exit_code(err)`` maps an
  exception to them; ``aetheris.cli`` prints one line (``--debug`` or ``AETHERIS_DEBUG=1``: the traceback).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_IO = 4
CKPT_PREFIX = "step-"
REJECTED = "rejected"


class RunFolderError(ValueError):
    """``out_dir`` belongs to another run (or the flags asking for it conflict)."""

    exit_code = EXIT_CONFIG


class RunIOError(OSError):
    """Writing a run's files failed: disk full, read-only, no permission. The message says which."""

    exit_code = EXIT_IO


class Interrupted(BaseException):
    """The run stopped on SIGTERM / SIGINT; ``checkpoint`` is where it can resume from (None: nothing trained).
    A BaseException, like KeyboardInterrupt, so that ``except Exception`` around a library call cannot swallow it."""

    def __init__(self, signum: int, checkpoint: Path | None, step: int | None, at_once: bool = False):
        self.signum, self.checkpoint, self.step, self.at_once = signum, checkpoint, step, at_once
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        if at_once:
            where = f"stopped at once by a second {name}"
        elif step is None:
            where = f"stopped by {name} before training started"
        else:
            where = f"stopped by {name} after step {step}"
        saved = f"checkpoint {checkpoint}; continue with --resume" if checkpoint else "no checkpoint written yet"
        super().__init__(f"{where}; {saved}")


# ----------------------------------------------------------------------------------------------
# Checkpoint folders


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CKPT_PREFIX):])


def list_checkpoints(root: Path) -> list[Path]:
    """Entries named ``step-<digits>`` under ``root``, oldest first: folders, and anything else that took such a
    name (a file where a folder should be is a rejected checkpoint, not something to ignore)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def read_run_id(folder: Path) -> str | None:
    """The ``run_id`` in a checkpoint's state.json (None when unreadable, or written before run ids existed)."""
    try:
        return json.loads((Path(folder) / "state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def reject(path: Path, reason: str) -> Path:
    """Move a checkpoint entry (folder or not) into ``<root>/rejected/`` and log why; returns its new path."""
    path = Path(path)
    dest_root = path.parent / REJECTED
    dest_root.mkdir(exist_ok=True)
    dest, n = dest_root / path.name, 1
    while dest.exists() or dest.is_symlink():
        dest, n = dest_root / f"{path.name}.{n}", n + 1
    os.replace(path, dest)
    with open(dest_root / "rejected.jsonl", "a") as f:
        f.write(json.dumps({"entry": dest.name, "from": str(path), "reason": reason, "time": time.time()}) + "\n")
    return dest


def prune_checkpoints(root: Path, run_id: str, newest: Path, keep_last: int) -> list[Path]:
    """Delete this run's checkpoints older than ``newest`` beyond the ``keep_last`` newest (``newest`` counts);
    checkpoints of other runs, newer steps, and anything unreadable are left alone."""
    step = checkpoint_step(newest)
    older = [p for p in list_checkpoints(root) if p.is_dir() and checkpoint_step(p) < step and read_run_id(p) == run_id]
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def claim_run_folder(out_dir: Path, *, resume, overwrite: bool, dry_run: bool = False,
                     log: Callable[[str], None] = print) -> None:
    """Make sure a run may use ``out_dir``: a fresh run (no ``resume``) refuses one that holds checkpoints unless
    ``overwrite``, which deletes them. ``dry_run``: only check (the CLI does this before loading anything)."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: --resume continues the run in "
                             "train.out_dir, --overwrite deletes its checkpoints and starts over; pass one")
    root = Path(out_dir) / "checkpoints"
    existing = list_checkpoints(root)
    if resume or not existing:
        return
    if not overwrite:
        names = ", ".join(p.name for p in existing[-3:])
        raise RunFolderError(
            f"{out_dir} already holds {len(existing)} checkpoint(s) of a run ({names}): pass --resume to continue "
            "that run, --overwrite to delete them and start over, or choose another out_dir")
    if dry_run:
        return
    for p in existing:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    log(f"--overwrite: deleted {len(existing)} checkpoint(s) of the previous run in {root}")


# ----------------------------------------------------------------------------------------------
# I/O failures


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding ``path`` (its nearest existing parent); None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno:
        return err.errno
    found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(err))  # safetensors / tokenizers (Rust) / torch
    return int(found.group(1) or found.group(2)) if found else None


def looks_like_io(err: BaseException) -> bool:
    """An exception from a write that is about the file system, whatever type the library gave it
    (torch: RuntimeError ``inline_container``; safetensors: SafetensorError; tokenizers: ``os error N``)."""
    if isinstance(err, OSError):
        return True
    text = f"{type(err).__name__} {err}"
    return any(s in text for s in ("SafetensorError", "inline_container", "os error", "Errno", "No space left",
                                   "Read-only file system"))


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file into it; a RunIOError saying what is wrong if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise write_failure(err, folder, "the run folder") from None


def write_failure(err: BaseException, path: Path, what: str) -> RunIOError:
    """A RunIOError naming the cause of a failed write (disk full, read-only, permission, ...) and the fix.

    torch and safetensors do not always raise OSError (torch: ``[enforce fail at inline_container.cc] unexpected
    pos``; safetensors: ``SafetensorError``), so the cause is read from the errno where there is one, and from
    the free space left otherwise."""
    code = _errno_of(err)
    free = free_bytes(path)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < (1 << 20)):
        why = (f"no space left on the device holding {path} ({free if free is not None else '?'} bytes free): "
               "free some space or point out_dir at a bigger disk, then resume with --resume")
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = (f"{path} is not writable ({os.strerror(code)}): make it writable or choose another out_dir")
    elif code == errno.EFBIG:
        why = f"a file under {path} hit the size limit (File too large; see `ulimit -f`)"
    elif code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        why = f"a path under {path} is in the way ({os.strerror(code)}): move it aside"
    else:
        why = f"writing under {path} failed ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    out = RunIOError(f"could not write {what}: {why}")
    out.errno = code or errno.EIO
    return out


# ----------------------------------------------------------------------------------------------
# Signals


class SignalGuard:
    """SIGTERM / SIGINT -> a stop request read by the training loop between optimizer steps.

    ``armed`` (set by the loop around its steps): the first signal only records the request; outside it there
    is nothing to save, so a signal raises ``Interrupted`` at once, as does a second signal."""

    def __init__(self, window: float = 1.0):
        self.window = window
        self.signum: int | None = None
        self.first_at = 0.0
        self.armed = False
        self.step: int | None = None  # the loop keeps these current for the message of a second signal
        self.checkpoint: Path | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> bool:
        """Install the handlers (main thread only); False when already installed or not possible here."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return False
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        self.signum = None
        return True

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        self.signum, self.armed = None, False

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is not None:
            if now - self.first_at < self.window:
                return  # the same request delivered twice (process group + torchrun forwarding it)
            raise Interrupted(signum, self.checkpoint, self.step, at_once=True)
        self.signum, self.first_at = signum, now
        if not self.armed:
            raise Interrupted(signum, None, None)
        if os.environ.get("RANK", "0") == "0":
            print(f"received {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self, accelerator=None) -> int | None:
        """The signal to stop for, the same on every rank (max over ranks), or None. A collective under
        several processes: every rank must call it at the same point of the loop."""
        signum = self.signum or 0
        if accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([signum], device=accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None


SIGNALS = SignalGuard()


# ----------------------------------------------------------------------------------------------
# Exit codes


def exit_code(err: BaseException) -> int | None:
    """The documented exit code for an expected failure; None for an unexpected one (a bug: show the traceback)."""
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(err, (FileNotFoundError, ValueError, KeyError)):
        return EXIT_CONFIG
    if isinstance(err, OSError):
        # Real I/O errors carry an errno; message-only OSErrors (transformers: "not a valid model identifier")
        # are about the input.
        return EXIT_IO if err.errno else EXIT_CONFIG
    if looks_like_io(err):
        return EXIT_IO
    return None


def one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__
