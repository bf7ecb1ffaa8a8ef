"""Stage 1 of ``aetheris distill``: weight transfer and teacher-forced, layer-local alignment.

MambaInLlama weight transfer, then MOHAWK/LoLCATs-style alignment:

1. Load the teacher (frozen, eval) and derive the student's config from it (``transfer.student_config``).
2. Transfer the weights (``transfer.transfer``); measure the student right after transfer and a randomly
   initialised one: KL(teacher || student) on held-out multilingual rows (``common.heldout_kl``), and per
   pair the relative error / cosine similarity of its residual update against the teacher's (``pair_report``).
3. Teacher-forced, layer-local training through the shared training loop (``train.train``, settings
   ``align.train``): pair k receives the teacher's hidden state at the input of its group of teacher layers
   and is trained to produce the teacher's hidden state at the group output, loss = normalised MSE
   ``||h_S - h_T||² / ||h_T - h_in||²`` averaged over pairs. All pairs train in one pass (they are
   independent), inside the forward of ``PairAligner`` (the module the loop DDP-wraps). For the first
   ``align.mixer_only_fraction`` of the steps only the SSM mixers train; then the whole pair (norms,
   mixer, router, experts; the MoE aux loss joins then). ``align.pairs_at_once`` trains k pairs at a time.
4. Measure again; write ``<out_dir>/align_report.json`` and the student to ``<out_dir>/student``.

Documents packed into one row are fed as one sequence to both teacher and student here (both see the same
context); padding counts in neither the MSE nor the MoE statistics.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from aetheris.config import AetherisConfig
from aetheris.distill.common import device_and_rank, heldout_kl, load_teacher_model, report_rows, write_stage
from aetheris.distill.config import DistillConfig
from aetheris.model import Aetheris, SSMMixer
from aetheris.teacher import hidden_states
from aetheris.tokenizer import load_tokenizer
from aetheris.train import RunConfig, build_data, find_resume_checkpoint, make_accelerator, train
from aetheris.transfer import check_compatible, layer_map, student_config, transfer


def pair_forward(student, k: int, h: Tensor, mixer_only: bool = False, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Student pair k on a residual stream h (B, T, D) -> (h after the pair, MoE aux loss).

    ``pad_mask`` (B, T) bool, True at real tokens: padding feeds nothing to the SSM and no MoE statistic.

    ``mixer_only``: the pair's parameters outside its SSM mixer take part detached, so no gradient reaches
    them (the function computed is the same). Honours ``gradient_checkpointing`` as the model's own forward
    does (one checkpoint per layer).
    """
    def call(layer, h):
        run = layer
        if mixer_only:
            keep = {id(p) for p in mixer_parameters(layer)}
            params = {name: p if id(p) in keep else p.detach() for name, p in layer.named_parameters()}
            run = lambda *args: functional_call(layer, params, args)  # noqa: E731
        if student.cfg.gradient_checkpointing and student.training and torch.is_grad_enabled():
            return checkpoint(run, h, None, pad_mask, use_reentrant=False)
        return run(h, None, pad_mask)

    if student.cfg.parallel_pairs:
        h, aux, _ = call(student.layers[k], h)
        return h, aux
    h, _, _ = call(student.layers[2 * k], h)
    h, aux, _ = call(student.layers[2 * k + 1], h)
    return h, aux


def pair_parameters(student, k: int) -> list[torch.nn.Parameter]:
    """The parameters of student pair k (its two layers, or its parallel pair)."""
    layers = [student.layers[k]] if student.cfg.parallel_pairs else [student.layers[2 * k], student.layers[2 * k + 1]]
    return [p for layer in layers for p in layer.parameters()]


def mixer_parameters(module) -> list[torch.nn.Parameter]:
    """The parameters of the SSM mixers inside ``module`` (the student, or one of its layers)."""
    return [p for m in module.modules() if isinstance(m, SSMMixer) for p in m.parameters()]


def normalised_mse(out: Tensor, target: Tensor, h_in: Tensor, mask: Tensor | None = None) -> Tensor:
    """||out - target||² / ||target - h_in||² over the positions where ``mask`` (B, T) is True (all when None):
    the error relative to the size of the teacher's update; padding counts in neither sum."""
    out, target, h_in = out.float(), target.float(), h_in.float()
    w = mask[..., None].float() if mask is not None else 1.0
    return ((out - target).square() * w).sum() / ((target - h_in).square() * w).sum().clamp_min(1e-12)


class PairAligner(torch.nn.Module):
    """Stage 1's training module: every student pair, teacher-forced, and the alignment loss, in ``forward``.

    The training loop prepares (DDP-wraps) this module rather than the bare student, because DDP
    all-reduces the gradients of the parameters used in the forward of the module it wraps: calling the
    student's layers from outside that forward would leave every rank with its own gradients. It holds
    the student (the parameters the optimizer updates and the loop checkpoints) and no teacher: the
    teacher's hidden states come in as input, so DDP never registers or broadcasts the teacher's weights.

    Which parameters train changes during the run: the SSM mixers only, then the whole pair; the
    embeddings and final norm never (the pair losses do not reach them). All parameters stay registered
    with ``requires_grad`` on, and the mixer-only phase uses the rest of each pair detached
    (``pair_forward``). Under several processes DDP must then be built with
    ``find_unused_parameters=True`` (see ``run_align``): it finds the parameters the step did not use,
    and a parameter unused on every rank keeps grad None, so AdamW skips it (no update, no weight decay,
    no optimizer state) exactly as in a single process. Toggling ``requires_grad`` instead breaks DDP:
    its gradient buckets are fixed when it is built, a bucket whose gradients never arrive is never
    reduced, and the next step fails; zeroed gradients would still let AdamW's weight decay shrink the
    "frozen" weights.
    """

    def __init__(self, student, pairs):
        super().__init__()
        self.student = student
        self.pairs = list(pairs)

    def forward(self, states: Sequence[Tensor], mixer_only: bool = False,
                pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher hidden states (``teacher.hidden_states``: L + 1 of (B, T, D)) -> (loss, per-pair
        normalised MSE (n_pairs,), MoE aux loss). The aux loss joins the loss in the whole-pair phase.
        ``pad_mask`` (B, T) bool: real tokens; padding counts in neither the MSE nor the MoE statistics."""
        dtype = self.student.embed.weight.dtype
        losses, aux = [], states[0].new_zeros((), dtype=torch.float32)
        for pm in self.pairs:
            h_in, target = states[pm.first].to(dtype), states[pm.last + 1].to(dtype)
            out, pair_aux = pair_forward(self.student, pm.pair, h_in, mixer_only=mixer_only, pad_mask=pad_mask)
            losses.append(normalised_mse(out, target, h_in, pad_mask))
            aux = aux + pair_aux
        per_pair = torch.stack(losses)
        return per_pair.mean() + (0 if mixer_only else aux), per_pair, aux


def make_align_loss(teacher, mixer_only_steps: int, progress: dict):
    """The loss_fn for ``train.train`` with ``forward_module=PairAligner(...)``: the teacher's hidden states
    (no grad), then the (possibly DDP-wrapped) aligner. The first ``mixer_only_steps`` train the mixers only."""
    def align_loss(aligner, batch: dict) -> tuple[Tensor, dict]:
        mixer_only = progress["step"] < mixer_only_steps
        with torch.no_grad():
            states = hidden_states(teacher, batch["input_ids"])
        pad_mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
        loss, per_pair, aux = aligner(states, mixer_only=mixer_only, pad_mask=pad_mask)
        return loss, {"nmse": per_pair.mean().detach(), "aux": aux.detach(), "pair_nmse": per_pair.detach(),
                      "mixer_only": torch.tensor(float(mixer_only))}

    return align_loss


@torch.no_grad()
def pair_report(teacher, student, pairs, rows: dict[str, Tensor], batch_size: int = 8) -> list[dict]:
    """Per pair: relative error and cosine similarity of the student's residual update (out - in) against
    the teacher group's, teacher-forced, plus the normalised MSE the alignment minimises."""
    device = next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    acc = [{"err": 0.0, "ref": 0.0, "cos": 0.0, "n": 0} for _ in pairs]
    for lang_rows in rows.values():
        for start in range(0, len(lang_rows["input_ids"]), batch_size):
            x = lang_rows["input_ids"][start:start + batch_size].to(device)
            real = lang_rows.get("attention_mask", torch.ones_like(lang_rows["input_ids"]))[start:start + batch_size]
            real = real.to(device).bool()                                      # padding counts nowhere
            states = hidden_states(teacher, x)
            for a, pm in zip(acc, pairs):
                h_in, target = states[pm.first].to(dtype), states[pm.last + 1].to(dtype)
                out, _ = pair_forward(student, pm.pair, h_in, pad_mask=real)
                ds, dt = (out - h_in).float()[real], (target - h_in).float()[real]  # (n_real, D)
                a["err"] += float((ds - dt).square().sum())
                a["ref"] += float(dt.square().sum())
                a["cos"] += float(torch.nn.functional.cosine_similarity(ds, dt, dim=-1).sum())
                a["n"] += ds.shape[0]
    return [{"pair": pm.pair, "teacher_layers": [pm.first, pm.last], "init_layer": pm.init,
             "relative_error": math.sqrt(a["err"] / max(a["ref"], 1e-30)), "nmse": a["err"] / max(a["ref"], 1e-30),
             "cosine": a["cos"] / max(a["n"], 1)} for a, pm in zip(acc, pairs)]


def build_student(cfg: DistillConfig, teacher_config) -> tuple[AetherisConfig, list]:
    """The student config and layer map from the teacher; incompatible settings fail here with field names."""
    scfg = student_config(teacher_config, n_pairs=cfg.student.n_pairs, parallel_pairs=cfg.student.parallel_pairs,
                          max_seq_len=max(cfg.data.seq_len, int(getattr(teacher_config, "max_position_embeddings", 0) or 0)),
                          **cfg.student.options)
    pairs = layer_map(teacher_config.num_hidden_layers, scfg.n_layer // 2, cfg.student.init_layer)
    check_compatible(teacher_config, scfg, pairs)
    return scfg, pairs


def run_align(cfg: DistillConfig, *, teacher=None, resume=None, log=print, overwrite: bool = False) -> dict:
    """Stage 1 end to end; returns the report (also written to ``<out_dir>/align_report.json``)."""
    out_dir = Path(cfg.align.train.out_dir)
    device, main_process = device_and_rank()
    # 1. Teacher, student config (fails before any data or weights are touched), tokenizer, data.
    if teacher is None:
        teacher = load_teacher_model(cfg)
    scfg, pairs = build_student(cfg, teacher.config)
    tokenizer = load_tokenizer(cfg.tokenizer.name or cfg.teacher.name)
    if len(tokenizer) > scfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocab_size is {scfg.vocab_size}: "
                         "use the teacher's own tokenizer (leave tokenizer.name unset)")
    run_cfg = RunConfig(model=scfg, tokenizer=cfg.tokenizer, data=cfg.data, train=cfg.align.train)
    data, tokenizer = build_data(run_cfg, lambda _docs: tokenizer, log)
    rows = report_rows(data.val, cfg.align.report_rows_per_language)

    # 2. Transfer, and the two reference points: random init vs right after transfer.
    torch.manual_seed(cfg.transfer.seed)
    random_student = Aetheris(scfg)
    student = Aetheris(scfg)
    tc = cfg.transfer
    sources = transfer(teacher, student, pairs, dt_init=tc.dt_init, attention_scale=tc.attention_scale,
                       expert_noise=tc.expert_noise, router_std=tc.router_std, seed=tc.seed)
    teacher.to(device)
    report: dict[str, Any] = {"teacher": cfg.teacher.name, "student_config": scfg.to_dict(),
                              "layer_map": [dataclasses.asdict(p) for p in pairs],
                              "heldout_rows": {k: len(v) for k, v in rows.items()}}
    report["kl_random_init"] = heldout_kl(teacher, random_student.to(device).eval(), rows)
    del random_student
    student.to(device).eval()
    report["kl_after_transfer"] = heldout_kl(teacher, student, rows)
    report["layers_after_transfer"] = pair_report(teacher, student, pairs, rows)
    log(f"KL(teacher||student) on held-out text: random init {report['kl_random_init']['mean']:.4f}, "
        f"after transfer {report['kl_after_transfer']['mean']:.4f} nats/token")

    # 3. Layer-local alignment through the shared loop: all pairs at once, or k at a time.
    k = cfg.align.pairs_at_once or len(pairs)
    groups = [pairs[i:i + k] for i in range(0, len(pairs), k)]
    stream_start = json.loads(json.dumps(data.stream.state_dict()))  # every group starts from the same batches
    mixer_only_steps = round(cfg.align.mixer_only_fraction * cfg.align.train.max_steps)
    for group in groups:
        if len(groups) > 1:
            tcfg = dataclasses.replace(cfg.align.train, out_dir=str(out_dir / f"pairs-{group[0].pair:02d}-{group[-1].pair:02d}"))
            run_cfg = dataclasses.replace(run_cfg, train=tcfg)
            data.stream.load_state_dict(json.loads(json.dumps(stream_start)))
            # Parameters outside the group take no gradient, so AdamW keeps no state for them.
            live = {id(p) for pm in group for p in pair_parameters(student, pm.pair)}
            for p in student.parameters():
                p.requires_grad_(id(p) in live)
            log(f"stage 1: pairs {group[0].pair}-{group[-1].pair} of {len(pairs)} ({len(live)} tensors train)")
        group_dir = Path(run_cfg.train.out_dir)
        start_step = 0
        if resume:
            ckpt = find_resume_checkpoint(group_dir / "checkpoints", log) if resume in (True, "latest") else Path(resume)
            if ckpt is not None:
                start_step = json.loads((Path(ckpt) / "state.json").read_text())["step"]
        progress = {"step": start_step}
        loss_fn = make_align_loss(teacher, mixer_only_steps, progress)
        # The parameters a step trains change with the phase, and the embeddings never train here, so DDP
        # must look for unused parameters every step (see PairAligner).
        result = train(run_cfg, loss_fn=loss_fn, model=student, forward_module=PairAligner(student, group),
                       accelerator=make_accelerator(run_cfg.train, find_unused_parameters=True), tokenizer=tokenizer,
                       data=data, frozen={"teacher": teacher}, resume=resume, overwrite=overwrite,
                       hooks=[lambda record, progress=progress: progress.__setitem__("step", record["step"])])
        student = result.model
    student.requires_grad_(True)

    # 4. After alignment.
    student.eval()
    report["kl_after_align"] = heldout_kl(teacher, student, rows)
    report["layers_after_align"] = pair_report(teacher, student, pairs, rows)
    report["steps"] = result.step
    report["mixer_only_steps"] = mixer_only_steps
    report["transfer_map"] = sources
    log(f"after alignment: KL {report['kl_after_align']['mean']:.4f} nats/token; per pair relative error "
        + ", ".join(f"{b['relative_error']:.3f}->{a['relative_error']:.3f}"
                    for b, a in zip(report["layers_after_transfer"], report["layers_after_align"])))
    if main_process:
        write_stage(out_dir, "align", report, student, tokenizer)
    return report
