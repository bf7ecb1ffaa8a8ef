"""Checkpoints: model folders anyone can load, and the training state a run resumes from.

**Model folders** (``save_model`` / ``load_model``): ``config.json`` + ``model.safetensors`` (+ tokenizer
files). The same folder loads with ``transformers.AutoModelForCausalLM.from_pretrained`` after
``import aetheris`` (tensor names carry the HF wrapper's ``model.`` prefix). Loading is strict: a
missing file, a foreign model type, or tensors that do not match the config are errors that say what
to fix — never a model with silently random weights. Only safetensors are read (no unpickling).

**Training checkpoints** (``save_checkpoint`` / ``verify_checkpoint`` / ``load_training_state``), the folder
``<out_dir>/checkpoints/step-0000100/`` the training loop writes::

    model/           save_model(): config.json + model.safetensors + tokenizer files (HF-loadable)
    optimizer.pt     optimizer state + torch RNG states (tensors only: loaded with weights_only=True)
    state.json       step, tokens, data position, Python/numpy RNG, the run config (what the loop passes)
    manifest.json    size and sha256 of every file above, written last

It is written to a temporary folder and renamed into place (atomic on POSIX), so a kill mid-write
leaves only an ignored ``.tmp-*`` folder. Loading checks the manifest; a corrupt or partial
checkpoint is rejected with a message and resuming falls back to the newest good one
(``find_resume_checkpoint``). What happens *around* the folders (which run owns ``out_dir``, pruning,
``rejected/``) is ``aetheris.runs``.

**Sharded runs** (``train.fsdp``): the full weights and optimizer state are gathered collectively
(``gather_full_state``; every process takes part, process 0 writes) and the optimizer state is stored by
parameter name, so a checkpoint is the ordinary folder whatever the process count, and resumes sharded or
not (``load_optimizer_state``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from . import runs
from .config import AetherisConfig
from .model import Aetheris
from .runs import CKPT_PREFIX, list_checkpoints

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREFIX = "model."  # AetherisForCausalLM keeps the plain model as .model


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """``safetensors.save_file``, leaving the file readable like any other the process writes.

    safetensors creates its file with mode 0600 whatever the umask, so a checkpoint written by root in a
    container could not be read by the non-root user that serves it (and looked corrupt); the file gets the
    mode ``open()`` would give it (0666 minus the umask)."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_model(model: Aetheris, folder: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
    """Write config.json, model.safetensors and (if given) the tokenizer into ``folder``.

    ``state_dict``: the weights to write instead of ``model.state_dict()`` (a sharded model's, gathered whole)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, Aetheris) and hasattr(model, "save_pretrained"):  # a transformers model (the nano teacher)
        model.save_pretrained(folder, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        return folder
    config = {"model_type": "aetheris", "architectures": ["AetherisForCausalLM"], **model.cfg.to_dict(),
              "tie_word_embeddings": model.cfg.tie_embeddings,
              "dtype": str(model.embed.weight.dtype).removeprefix("torch.")}
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config.get(key) is None:
                config[key] = getattr(tokenizer, key, None)
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {PREFIX + k: v.detach().contiguous() for k, v in state.items()}
    write_safetensors(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def read_config(folder: str | Path) -> AetherisConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist; pass the folder holding "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME} (e.g. a run's final/ folder)")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a model checkpoint")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt") from None
    if data.get("model_type") != "aetheris":
        raise ValueError(f"{path} describes a {data.get('model_type')!r} model, not an Aetheris one; load it with "
                         "transformers.AutoModelForCausalLM instead")
    return AetherisConfig.from_dict(data, ignore_hf_keys=True)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / WEIGHTS_NAME
    index = folder / (WEIGHTS_NAME + ".index.json")  # sharded, as transformers writes large models
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{single} is missing: the checkpoint has a config but no weights. "
                                "Refusing to continue with random weights; point at a complete checkpoint.")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{f} cannot be read ({err}); the file is truncated or corrupt") from None
    return tensors


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Aetheris:
    """Load an Aetheris checkpoint strictly (every tensor present, right shapes, nothing extra)."""
    folder = Path(folder)
    cfg = read_config(folder)
    tensors = _read_tensors(folder)
    state = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    with torch.device("meta"):
        model = Aetheris(cfg)  # shapes only; real tensors are assigned below
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(s)}"
                        for k, s in expected.items() if k in state and state[k].shape != s)
    if missing or unexpected or mismatched:
        parts = [f"{name} ({len(v)}): {v[:5]}" for name, v in
                 (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)) if v]
        raise ValueError(f"weights in {folder} do not match its {CONFIG_NAME}: " + "; ".join(parts))
    model.load_state_dict(state, assign=True)
    model.tag_no_weight_decay()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)



# ----------------------------------------------------------------------------------------------
# Training checkpoints: the state a run resumes from


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(root: Path, step: int, model, tokenizer, optimizer, state: dict, keep_last: int,
                    gathered: tuple[dict, dict] | None = None) -> Path:
    """Write ``root/step-XXXXXXX`` atomically (temp folder + rename); prune this run's older ones afterwards.

    ``state``: what the loop needs back (step, data position, ``run_id``, ...), written to state.json together
    with the Python and numpy RNG states; the torch RNG states go into optimizer.pt (tensors).
    ``gathered``: (model state, optimizer state by parameter name) already collected from every process of
    a sharded run (``gather_full_state``); written instead of ``model``'s and ``optimizer``'s own.
    A failed write (disk full, read-only, ...) removes its temp folder and raises ``RunIOError`` naming the
    cause; the checkpoints already on disk are untouched."""
    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    state = {**state, "python_rng": random.getstate(), "numpy_rng": _numpy_state()}
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_model(model, tmp / "model", tokenizer=tokenizer, state_dict=gathered[0] if gathered else None)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        optim = {"optimizer": gathered[1], "keys": "names"} if gathered else {"optimizer": optimizer.state_dict()}
        torch.save({**optim, "rng": rng}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        _fsync_tree(tmp)
        if final.exists() or final.is_symlink():  # a step re-saved after resuming from an older checkpoint, or
            runs.reject(final, f"replaced by step {step} of run {state.get('run_id')}")  # a file in the way
        os.replace(tmp, final)
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:  # an interrupt too: no partial folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception) or isinstance(err, runs.RunIOError) or not runs.looks_like_io(err):
            raise
        raise runs.write_failure(err, root, f"checkpoint {final.name}") from err
    runs.prune_checkpoints(root, state.get("run_id"), final, keep_last)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def verify_checkpoint(folder: Path) -> dict:
    """The manifest of a checkpoint whose files are all present and intact; CheckpointError otherwise."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not folder.exists():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is not a folder (something replaced it with a file)")
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {folder} is incomplete: manifest.json is missing (the write never finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {folder} has an unreadable manifest.json ({err})") from None
    for name, meta in files.items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} has {path.stat().st_size} bytes, expected {meta['bytes']}")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its checksum")
    return manifest


def find_resume_checkpoint(root: Path, log: Callable[[str], None] = print, reject: bool = False) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; newer ones that do not are reported and skipped
    (``reject``: moved into ``root/rejected/``, never deleted). None when ``root`` holds no checkpoint at all;
    a CheckpointError when it holds some and none verifies (starting over would bury them)."""
    failed = []
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            failed.append((folder, err))
            continue
        for bad, err in failed:
            moved = f"; moved to {runs.reject(bad, str(err))}" if reject else ""
            log(f"warning: {err}{moved}; falling back to an older checkpoint")
        return folder
    if failed:
        raise CheckpointError(
            f"--resume found {len(failed)} checkpoint(s) under {root} and none verifies ("
            + "; ".join(str(err) for _, err in failed[:3]) + "). Nothing was changed: resume from a named good "
            "checkpoint (--resume PATH), repair or move them, or start over with --overwrite")
    return None


def check_resume_model(checkpoint: Path, model_cfg: AetherisConfig) -> None:
    """Refuse to resume into a model whose config differs from the checkpoint's, naming the keys that differ
    (instead of a tensor size mismatch later). Settings that change no weight (memory, kernels) may change."""
    free = {"gradient_checkpointing", "scan_impl", "chunk_size", "max_seq_len", "bos_token_id", "eos_token_id", "pad_token_id"}
    saved, now = read_config(Path(checkpoint) / "model").to_dict(), model_cfg.to_dict()
    diff = [f"model.{k}: checkpoint {saved[k]!r}, this run {now[k]!r}" for k in saved if k not in free and saved[k] != now.get(k)]
    if diff:
        raise CheckpointError(f"cannot resume from {checkpoint}: its model differs from this run's ({'; '.join(diff)}). "
                              "Resume with the checkpoint's model settings, or start a new run (--overwrite or another out_dir)")


def load_training_state(folder: Path, model, optimizer) -> dict:
    """Resume from checkpoint ``folder`` (weights already loaded into ``model``): restore ``optimizer``'s state and
    the torch, CUDA, Python and numpy RNG streams, and return state.json (step, data position, ...) for the loop."""
    folder = Path(folder)
    blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    load_optimizer_state(model, optimizer, blob, folder)
    state = json.loads((folder / "state.json").read_text())
    _restore_rng(blob["rng"], state)
    return state


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _restore_rng(rng: dict, state: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------
# Sharded (FSDP2) states
#
# torch.distributed.checkpoint is imported where used: it costs ~3 s at import, which every model load would
# otherwise pay, and only sharded runs need it.


def gather_full_state(model, optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts of a sharded model, on process 0's CPU (empty elsewhere).
    Collective: every process must call it. Optimizer state is keyed by parameter name, not index."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, blob: dict, where: Path) -> None:
    """Restore optimizer state saved by index (``optimizer.state_dict()``) or by parameter name (a sharded run's
    gathered state: loads into a sharded or a plain model alike, so such a checkpoint resumes at any process count)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if blob.get("keys") == "names":
        set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=StateDictOptions(full_state_dict=True))
    elif is_sharded(model):
        raise CheckpointError(f"checkpoint {where} was written without train.fsdp (optimizer state by index): resume "
                              "it with train.fsdp=false, or start the sharded run afresh")
    else:
        optimizer.load_state_dict(blob["optimizer"])


def is_sharded(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def unshard_model(model):
    """A plain (unsharded) copy of a sharded ``Aetheris`` with the full weights, on every process (collective)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        plain = Aetheris(model.cfg)
    plain.load_state_dict({k: v.detach().clone() for k, v in full.items()}, assign=True)
    plain.tag_no_weight_decay()
    return plain
