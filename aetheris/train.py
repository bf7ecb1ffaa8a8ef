"""The training loop: one explicit loop used to train from scratch and reused by the distillation stages.

    aetheris train --config configs/nano-scratch.yaml [key.sub=value ...] [--resume [CHECKPOINT]]
    aetheris train --help-config                      # every config key: type, default, description

``train(cfg, ...)`` reads top to bottom:

1. ``_start``: Accelerator (plain ``python``, ``torchrun`` or ``accelerate launch``: DDP/FSDP come from
   Accelerate), seeds, the run folder and the checkpoint to resume from, tokenizer (pretrained by name/path,
   or a byte-level BPE trained on the training split), data (documents -> held-out split per language ->
   packed, language-balanced ``PackedStream``; every rank builds the same stream and takes its own slice of
   each global batch, so the data a step sees does not depend on the number of processes), model, AdamW with
   the model's no-decay groups, and ``_restore`` of a checkpoint's weights, optimizer, RNG, data position and
   stateful objects.
2. The loop, one optimizer step at a time: ``_optimizer_step`` (the lr schedule, ``grad_accum``
   micro-batches of ``loss_fn(model, batch) -> (loss, metrics)``, clipping, a non-finite check that stops
   the run with the last good checkpoint intact), then the cadence: ``_log`` every ``log_every`` steps,
   ``_evaluate`` (validation loss per language) every ``eval_every``, ``_checkpoint`` every
   ``checkpoint_every``; a SIGTERM / SIGINT checkpoints the step and stops (``_stop_if_signalled``).

A distillation stage plugs in without subclassing: it passes its own ``loss_fn`` (closing over a
teacher), lists the teacher in ``frozen`` (moved to the device, eval mode, no grads), and may pass its
own ``data`` (any object with ``next_batch(n)``, ``state_dict()`` and ``load_state_dict()``). A stage
whose loss is not a plain ``model(...)`` call passes a ``forward_module`` wrapping the model, so the
module DDP wraps is the one whose forward runs (otherwise gradients are not all-reduced).

The config sections are ``aetheris.train_config``; checkpoint folders (``<out_dir>/checkpoints/step-0000100/``:
the model, optimizer.pt, state.json, manifest.json; written atomically, verified on load) are
``aetheris.checkpoint``; what happens around them (run ownership, pruning, signals, exit codes) is
``aetheris.runs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from torch.distributed.fsdp import fully_shard

from aetheris import runs
from aetheris.checkpoint import (  # noqa: F401 (verify_checkpoint: re-exported)
    CheckpointError,
    check_resume_model,
    find_resume_checkpoint,
    gather_full_state,
    load_model,
    load_training_state,
    save_checkpoint,
    unshard_model,
    verify_checkpoint,
)
from aetheris.config_io import ConfigError, add_config_help, to_dict
from aetheris.model import Aetheris
from aetheris.progress import progress_bar
from aetheris.runs import CKPT_PREFIX, Interrupted, list_checkpoints  # noqa: F401 (re-exported)
from aetheris.tokenizer import load_tokenizer
from aetheris.train_config import DataConfig, RunConfig, TokenizerConfig, TrainConfig, load_config  # noqa: F401 (re-exported)
from aetheris.train_data import TrainData, build_data, build_tokenizer  # noqa: F401 (re-exported)

# ----------------------------------------------------------------------------------------------
# Schedule, loss


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    floor = t.lr * t.min_lr_ratio
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, round(t.decay_fraction * t.max_steps))  # WSD: stable, then linear decay
    decay_start = t.max_steps - decay_steps
    if step < decay_start:
        return t.lr
    return t.lr + (floor - t.lr) * min(1.0, (step - decay_start + 1) / decay_steps)


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy + MoE aux loss: the from-scratch objective (and the loss_fn contract)."""
    out = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"], attention_mask=batch.get("attention_mask"))
    metrics = {"ce": out.ce_loss.detach(), "aux": out.aux_loss.detach()}
    if out.expert_load is not None:
        metrics["expert_load"] = out.expert_load.detach()
    return out.loss, metrics


@torch.no_grad()
def validation_loss(model, val: dict[str, dict], micro_batch_size: int, device) -> dict[str, float]:
    """Token-weighted mean cross-entropy per language on the held-out rows."""
    was_training = model.training
    model.eval()
    out = {}
    for lang, rows in val.items():
        total, count = 0.0, 0
        for start in range(0, len(rows["input_ids"]), micro_batch_size):
            batch = {k: torch.as_tensor(v[start:start + micro_batch_size], device=device) for k, v in rows.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            ce = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"]).ce_loss
            total, count = total + float(ce) * n, count + n
        out[lang] = total / max(count, 1)
    model.train(was_training)
    return out


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before the optimizer step."""

    exit_code = runs.EXIT_NONFINITE


# ----------------------------------------------------------------------------------------------
# Processes: the Accelerator, the run folder, sharding (FSDP2)


def multi_process_cpu() -> bool:
    """Launched with several processes and no GPU: Accelerate only sets up gloo when told ``cpu=True``
    (on GPUs it picks nccl itself)."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rows_per_run(t: TrainConfig, processes: int) -> int:
    """Training rows a run of ``t`` consumes over all its steps and processes."""
    return t.max_steps * t.micro_batch_size * t.grad_accum * processes


def open_run_folder(out_dir: Path, resume, overwrite: bool, accelerator, log: Callable[[str], None]) -> Path | None:
    """Claim ``out_dir`` for this run (``runs.claim_run_folder``: a fresh run refuses another run's checkpoints)
    and return the checkpoint to resume from. Decided on the main process, which alone moves rejected checkpoints
    aside, and shared with the other ranks (an error too, so every rank stops with the same message)."""
    decision: list = [None, None]  # (checkpoint, error)
    if accelerator.is_main_process:
        try:
            runs.check_writable(out_dir / "checkpoints")
            runs.claim_run_folder(out_dir, resume=resume, overwrite=overwrite, log=log)
            if resume is True or resume == "latest":
                decision[0] = find_resume_checkpoint(out_dir / "checkpoints", log=log, reject=True)
                if decision[0] is None:
                    log(f"no checkpoint under {out_dir / 'checkpoints'}: starting from scratch")
            elif resume:
                decision[0] = Path(resume)
                verify_checkpoint(decision[0])
        except (ValueError, OSError) as err:
            decision[1] = err
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    if decision[1] is not None:
        raise decision[1]
    return decision[0]


def make_accelerator(t: TrainConfig, **ddp_options) -> Any:
    """The run's Accelerator: mixed precision and tracker from ``t``; ``ddp_options`` (e.g.
    ``find_unused_parameters=True``) go to DistributedDataParallel when the run has several processes."""
    precision = t.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        # Accelerate keeps one process-wide precision and refuses another; the stages of one `aetheris distill`
        # may each choose theirs. Forget the old setting only (the process group stays).
        AcceleratorState._reset_state()
    tracker = None if t.tracker in (None, "", "none") else t.tracker
    handlers = [DistributedDataParallelKwargs(**ddp_options)] if ddp_options else None
    return Accelerator(mixed_precision=precision, log_with=tracker, project_dir=str(Path(t.out_dir)), cpu=multi_process_cpu(),
                       kwargs_handlers=handlers)


# Accelerate turns FSDP on only for accelerators (on CPU it silently falls back to DDP), so the loop shards
# with torch's own ``fully_shard``: the same code on CPU (gloo) and GPU (nccl). Each layer is one unit
# (its weights are gathered for its forward and backward, then freed); the embeddings and final norm form
# the root unit. Checkpoints gather the full state collectively (``checkpoint.gather_full_state``).
# torch.distributed's FSDP modules are imported where used: seconds of import that only sharded runs need.


def shard_model(model, device) -> None:
    """Shard an ``Aetheris`` in place over the default process group: one FSDP unit per layer + the root."""
    model.to(device)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.tag_no_weight_decay()  # sharding replaced the parameters (DTensors): tags must be set again


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    last_checkpoint: Path | None
    history: list[dict]  # one record per logged step
    val_history: list[dict]  # {"step": s, "loss": {lang: ce}}
    model: Any = None
    tokenizer: Any = None


@dataclass
class _Run:
    """What the loop carries from step to step; ``_start`` builds it, the pieces below read and advance it."""

    cfg: RunConfig
    accelerator: Any
    model: Any  # what loss_fn calls: the prepared (DDP-wrapped) model or forward_module
    raw_model: Any  # the Aetheris being optimised, validated and checkpointed
    optimizer: Any
    data: TrainData
    tokenizer: Any
    stateful: dict[str, Any]
    sharded: bool
    run_id: str  # marks this run's checkpoints: cleanup touches no other run's
    step: int = 0
    tokens_seen: int = 0
    last_ckpt: Path | None = None
    history: list[dict] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    window_tokens: int = 0  # tokens since the last logged step (for tokens/s)
    window_start: float = 0.0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    def say(self, text: str) -> None:
        self.accelerator.print(text)


def train(
    cfg: RunConfig,
    *,
    loss_fn: Callable[[Any, dict], tuple[torch.Tensor, dict]] = lm_loss,
    model=None,
    tokenizer=None,
    data: TrainData | None = None,
    frozen: dict[str, torch.nn.Module] | None = None,
    resume: str | Path | bool | None = None,
    hooks: Sequence[Callable[[dict], None]] = (),
    stateful: dict[str, Any] | None = None,
    accelerator=None,
    forward_module: torch.nn.Module | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``model`` (default: a fresh ``Aetheris(cfg.model)``) and return what happened.

    ``resume``: True/"latest" = newest good checkpoint in ``out_dir`` (fresh start if there is none at all; an
    error if there are some and none verifies); a path = that checkpoint (an error if it is corrupt). Without
    ``resume``, an ``out_dir`` holding checkpoints is refused unless ``overwrite`` (which deletes them).
    SIGTERM / SIGINT stop the loop after the current step with a checkpoint (``runs.Interrupted``).
    ``hooks`` run after every optimizer step with a dict of the step's numbers (a stage may adjust weights
    there; a test may stop the run).
    ``forward_module``: a module holding ``model`` whose forward computes a stage's own loss (stage 1
    runs teacher-forced pairs); ``loss_fn`` then receives it instead of ``model``. Accelerate prepares
    (DDP-wraps) the module ``loss_fn`` calls, because DDP all-reduces gradients only through the forward
    of the module it wraps; ``model`` is still what is optimised, validated and checkpointed.
    ``accelerator``: one made by ``make_accelerator`` (e.g. with DDP options); default: one from ``cfg.train``.
    ``stateful``: named objects with ``state_dict()`` -> JSON-able dict and ``load_state_dict()`` (a loss's own
    state, e.g. stage 2's group-DRO weights), saved in every checkpoint's state.json and restored on resume.
    """
    run = _start(cfg, model=model, tokenizer=tokenizer, data=data, frozen=frozen, resume=resume, stateful=stateful,
                 accelerator=accelerator, forward_module=forward_module, overwrite=overwrite)
    t, accelerator = cfg.train, run.accelerator
    rows_per_step = t.micro_batch_size * t.grad_accum * accelerator.num_processes
    if run.step == 0 and run.data.val:
        _evaluate(run)
    # A live bar on a terminal; one line per ~10 % of the steps when stderr is a log file (make demo > log).
    bar = progress_bar(total=t.max_steps, initial=run.step, disable=not (t.progress and accelerator.is_local_main_process),
                       desc="train")
    run.model.train()
    run.window_start = time.perf_counter()
    installed = runs.SIGNALS.install()  # the CLI installs them for the whole command; a library call here
    runs.SIGNALS.armed, runs.SIGNALS.step, runs.SIGNALS.checkpoint = True, run.step, run.last_ckpt
    try:
        while True:
            _stop_if_signalled(run)  # after the previous step (and its checkpoint); the same decision on every rank
            if run.step >= t.max_steps:
                break
            rows = run.data.stream.next_batch(rows_per_step)  # the same global batch on every rank
            record = _optimizer_step(run, loss_fn, rows)
            runs.SIGNALS.step = run.step
            if run.step % t.log_every == 0 or run.step == t.max_steps or run.step == 1:
                _log(run, record, bar)
            bar.update(1)
            for hook in hooks:
                hook(record)
            if run.data.val and (run.step % t.eval_every == 0 or run.step == t.max_steps):
                _evaluate(run)
            if run.step % t.checkpoint_every == 0 or run.step == t.max_steps:
                _checkpoint(run)
    finally:
        runs.SIGNALS.armed = False
        if installed:
            runs.SIGNALS.uninstall()
        bar.close()
        if run.data.malformed.total:
            run.say(run.data.malformed.summary())
        if accelerator.is_main_process and accelerator.log_with:
            accelerator.end_training()
    raw_model = run.raw_model
    if run.sharded:  # callers measure, generate and save the result: give them the whole model (collective)
        raw_model = unshard_model(raw_model)
    return TrainResult(run.step, run.out_dir, run.last_ckpt, run.history, run.val_history, raw_model, run.tokenizer)


# ----------------------------------------------------------------------------------------------
# Start and restore


def _start(cfg: RunConfig, *, model, tokenizer, data, frozen, resume, stateful, accelerator, forward_module,
           overwrite) -> _Run:
    """Everything before the first step: processes, run folder, tokenizer, data, model, optimizer, resumed state."""
    t = cfg.train
    out_dir = Path(t.out_dir)
    if t.threads:
        torch.set_num_threads(t.threads)
    if accelerator is None:
        accelerator = make_accelerator(t)
    say = accelerator.print
    set_seed(t.seed)

    # The run folder is this run's, and which checkpoint (if any) to resume from: decided before building anything.
    start_ckpt = open_run_folder(out_dir, resume, overwrite, accelerator, say)
    if start_ckpt is not None and model is None:
        check_resume_model(start_ckpt, cfg.model)  # a changed model.d_model is named here, before the data loads

    if tokenizer is None and start_ckpt is not None and not cfg.tokenizer.name:
        tokenizer = load_tokenizer(start_ckpt / "model")  # the run's own BPE, as saved
    if data is None:
        data, tokenizer = build_data(cfg, lambda docs: tokenizer or build_tokenizer(cfg, docs, out_dir, accelerator), say)
    elif tokenizer is None:
        tokenizer = build_tokenizer(cfg, None, out_dir, accelerator) if cfg.tokenizer.name else None

    if model is None:
        model = _new_model(cfg, tokenizer)
    sharded = t.fsdp and accelerator.num_processes > 1
    if sharded and forward_module is not None:
        raise ConfigError("train.fsdp=true: this stage trains through its own forward module (stage 1's pairs), which "
                          "is not sharded; set train.fsdp=false (stage 1 fits one GPU with align.pairs_at_once=1)")
    if start_ckpt is not None:  # weights before sharding: the checkpoint holds them whole
        check_resume_model(start_ckpt, model.cfg)
        saved = load_model(start_ckpt / "model")
        model.load_state_dict(saved.state_dict())
        del saved
    if sharded:
        shard_model(model, accelerator.device)
    # The fused AdamW step updates each tensor in one kernel: no temporaries (the per-tensor step holds two of
    # the largest tensor, 4 GiB for a 262k-vocabulary embedding). Sharded (DTensor) parameters keep the default.
    # A model without its own groups (the demo's transformers Cohere2 teacher) decays every trainable parameter.
    groups = model.param_groups(t.weight_decay) if hasattr(model, "param_groups") else \
        [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": t.weight_decay}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  fused=None if sharded else True)
    run = _Run(cfg, accelerator, model, model, optimizer, data, tokenizer, stateful or {}, sharded,
               run_id=uuid.uuid4().hex[:12])
    if start_ckpt is not None:
        _restore(run, start_ckpt)
    for module in (frozen or {}).values():
        module.eval().requires_grad_(False)
        module.to(accelerator.device)
    _prepare(run, forward_module)
    _open_logs(run)
    return run


def _new_model(cfg: RunConfig, tokenizer) -> Aetheris:
    """A fresh ``Aetheris(cfg.model)`` whose unset special token ids come from the tokenizer."""
    mcfg = dataclasses.replace(cfg.model)
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(mcfg, name) is None:
                setattr(mcfg, name, getattr(tokenizer, name))
    return Aetheris(mcfg)


def _restore(run: _Run, checkpoint: Path) -> None:
    """Continue from ``checkpoint`` (its weights already loaded): optimizer, RNG, step, data position, stateful objects."""
    state = load_training_state(checkpoint, run.raw_model, run.optimizer)
    run.step, run.tokens_seen = state["step"], state["tokens_seen"]
    run.run_id = state.get("run_id") or run.run_id
    run.val_history = state.get("val_history", [])
    run.last_ckpt = checkpoint
    run.data.stream.load_state_dict(state["data"])
    for name, obj in run.stateful.items():
        if name not in state.get("stateful", {}):
            raise CheckpointError(f"checkpoint {checkpoint} holds no state for {name!r}: it was written by a run "
                                  "with other settings; resume with the same config, or start afresh")
        obj.load_state_dict(state["stateful"][name])
    run.say(f"resumed from {checkpoint} at step {run.step}")


def _prepare(run: _Run, forward_module) -> None:
    """Hand the model and optimizer to Accelerate: device placement, DDP wrapping (not when sharded)."""
    accelerator = run.accelerator
    if run.sharded:  # already distributed: Accelerate only wraps the optimizer; autocast comes from the loop
        run.optimizer = accelerator.prepare(run.optimizer)
    elif forward_module is None:
        run.model, run.optimizer = accelerator.prepare(run.model, run.optimizer)
        run.raw_model = accelerator.unwrap_model(run.model)
    else:  # the wrapper shares model's parameters: preparing it moves and DDP-wraps them
        if not any(m is run.raw_model for m in forward_module.modules()):
            raise ValueError("forward_module must hold model as a submodule (it trains model's parameters)")
        run.model, run.optimizer = accelerator.prepare(forward_module, run.optimizer)


def _open_logs(run: _Run) -> None:
    """Trackers, ``metrics.jsonl`` cut back to the resume point, and the run's ``config.json``."""
    accelerator = run.accelerator
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers("train", config=_flat_hparams(run.cfg))
    if accelerator.is_main_process:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = run.out_dir / "metrics.jsonl"
        if metrics_file.exists():  # drop records past the resume point (a killed run logged them)
            kept = [line for line in metrics_file.read_text().splitlines() if line and json.loads(line)["step"] <= run.step]
            metrics_file.write_text("".join(line + "\n" for line in kept))
        (run.out_dir / "config.json").write_text(json.dumps(to_dict(run.cfg), indent=1, default=str))


# ----------------------------------------------------------------------------------------------
# One optimizer step


def _optimizer_step(run: _Run, loss_fn, rows: dict) -> dict:
    """One optimizer step on this step's global batch ``rows``; returns the step's record (loss, lr, grad norm,
    tokens, the loss_fn's metrics), averaged over micro-batches and processes."""
    t, accelerator, model = run.cfg.train, run.accelerator, run.model
    world, rank = accelerator.num_processes, accelerator.process_index
    lr = lr_at(run.step, t)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=accelerator.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for micro in range(t.grad_accum):
        block = micro * world + rank  # 1 rank x 2 micro-batches == 2 ranks x 1 micro-batch
        sl = slice(block * t.micro_batch_size, (block + 1) * t.micro_batch_size)
        batch = {k: torch.as_tensor(v[sl], device=accelerator.device) for k, v in rows.items()}
        sync = micro == t.grad_accum - 1
        if run.sharded:  # reduce-scatter the gradients once, after the last micro-batch
            model.set_requires_gradient_sync(sync)
        with nullcontext() if sync or run.sharded else accelerator.no_sync(model):
            with accelerator.autocast() if run.sharded else nullcontext():
                loss, metrics = loss_fn(model, batch)
            accelerator.backward(loss / t.grad_accum)
        loss_sum += loss.detach().float()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
    # Mean over micro-batches and ranks; every rank sees the same number, so all stop together.
    loss_mean = accelerator.reduce(loss_sum / t.grad_accum, reduction="mean")
    params = [p for p in run.raw_model.parameters() if p.requires_grad]
    grad_norm = accelerator.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor when the gradients are sharded
        grad_norm = grad_norm.full_tensor()
    grad_norm = torch.as_tensor(grad_norm).float()
    if not torch.isfinite(loss_mean) or not torch.isfinite(grad_norm):
        what = "loss" if not torch.isfinite(loss_mean) else "gradient norm"
        raise NonFiniteLossError(
            f"the {what} became {float(loss_mean if what == 'loss' else grad_norm)} at step {run.step + 1}; "
            f"the run stopped before updating the weights. Last good checkpoint: {run.last_ckpt or 'none yet'}. "
            "Try a lower train.lr, a longer warmup, train.grad_clip=1.0, or mixed_precision=no; "
            f"then resume with --resume {run.last_ckpt or ''}".rstrip()
        )
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    step_tokens = int(np.prod(rows["input_ids"].shape))
    run.tokens_seen += step_tokens
    run.window_tokens += step_tokens
    record = {"step": run.step, "loss": float(loss_mean), "lr": lr, "grad_norm": float(grad_norm), "tokens": run.tokens_seen}
    for k, v in metric_sums.items():
        v = accelerator.reduce(v / t.grad_accum, reduction="mean")
        record[k] = v.tolist() if v.ndim else float(v)
    return record


# ----------------------------------------------------------------------------------------------
# Logging, validation, checkpoints, signals


def _log(run: _Run, record: dict, bar) -> None:
    """Add tokens/s over the steps since the last log; write the record to the trackers and metrics.jsonl."""
    now = time.perf_counter()
    record["tokens_per_s"] = run.window_tokens / max(now - run.window_start, 1e-9)
    run.window_tokens, run.window_start = 0, now
    run.history.append(record)
    if run.accelerator.is_main_process:
        _log_step(run.accelerator, record)
        with open(run.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")


def _evaluate(run: _Run) -> None:
    losses = validation_loss(run.raw_model, run.data.val, run.cfg.train.micro_batch_size, run.accelerator.device)
    mean = sum(losses.values()) / max(len(losses), 1)
    run.val_history.append({"step": run.step, "mean": mean, "loss": losses})
    if run.accelerator.is_main_process:
        run.accelerator.log({"val/loss": mean, **{f"val/loss_{lang}": v for lang, v in losses.items()}}, step=run.step)
        worst = max(losses, key=losses.get) if losses else "-"
        run.say(f"step {run.step}: validation loss {mean:.4f} (mean over {len(losses)} languages; "
                f"worst {worst} {losses.get(worst, 0):.3f})")


def _checkpoint(run: _Run) -> Path:
    """Save this step's state (collective: every process calls it; sharded states are gathered, process 0 writes)."""
    accelerator, root = run.accelerator, run.out_dir / "checkpoints"
    accelerator.wait_for_everyone()
    gathered = gather_full_state(run.raw_model, run.optimizer) if run.sharded else None  # collective
    if accelerator.is_main_process:
        state = {
            "step": run.step, "tokens_seen": run.tokens_seen, "data": run.data.stream.state_dict(),
            "config": to_dict(run.cfg), "world_size": accelerator.num_processes, "val_history": run.val_history,
            "stateful": {name: obj.state_dict() for name, obj in run.stateful.items()},
            "run_id": run.run_id,
        }
        save_checkpoint(root, run.step, run.raw_model, run.tokenizer, run.optimizer, state, run.cfg.train.keep_last, gathered)
    accelerator.wait_for_everyone()
    run.last_ckpt = root / f"{CKPT_PREFIX}{run.step:07d}"  # every rank names it (only the main process wrote it)
    runs.SIGNALS.checkpoint = run.last_ckpt
    return run.last_ckpt


def _stop_if_signalled(run: _Run) -> None:
    """SIGTERM / SIGINT arrived (on any rank): checkpoint this step unless it is saved already, and stop."""
    signum = runs.SIGNALS.requested(run.accelerator)
    if signum is None:
        return
    last = run.last_ckpt
    saved = last if last is not None and runs.checkpoint_step(last) == run.step else None
    if saved is None and run.step > 0:
        saved = _checkpoint(run)
    raise Interrupted(signum, saved or last, run.step)


def _flat_hparams(cfg: RunConfig) -> dict:
    flat = {}
    for section, values in to_dict(cfg).items():
        for k, v in (values or {}).items():
            flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _log_step(accelerator, record: dict) -> None:
    scalars = {f"train/{k}": v for k, v in record.items() if isinstance(v, float) and k != "step"}
    load = record.get("expert_load")
    if isinstance(load, list):  # (n_moe_layers, E) fractions of tokens per expert
        for i, layer in enumerate(load):
            for e, frac in enumerate(layer):
                scalars[f"expert_load/layer{i}/expert{e}"] = frac
    accelerator.log(scalars, step=record["step"])


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.max_steps=20")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from the newest good checkpoint in train.out_dir, or from CHECKPOINT")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a train.out_dir that holds another run's checkpoints (deletes them)")
    add_config_help(parser, RunConfig)


def run(args) -> int:
    """Failures propagate to ``aetheris.cli``, which prints one line and exits with the documented code."""
    cfg = load_config(args.config, args.overrides)
    runs.claim_run_folder(Path(cfg.train.out_dir), resume=args.resume, overwrite=args.overwrite, dry_run=True)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if result.val_history:
        first, last = result.val_history[0], result.val_history[-1]
        print(f"validation loss {first['mean']:.4f} (step {first['step']}) -> {last['mean']:.4f} (step {last['step']}); "
              f"checkpoint: {result.last_checkpoint}")
    return 0
