"""Stage 2 of ``aetheris distill``: logit distillation of every student parameter, online or from a cache.

The loss (``make_kd_loss``, also stage 3's) is ``w_kl·τ²·KL(p_T || p_S) + w_ce·CE + MoE aux``, a per-token
mean over valid positions, built from ``aetheris.losses``: ``teacher_divergence`` (``chunked_divergence``
against the teacher's logits, or ``chunked_topk_divergence`` against a teacher cache's top-k log-probs) and
``token_mean`` -- so the loss that trains equals ``losses.distill_loss`` / ``cached_distill_loss`` (pinned by
tests/test_packed_kd.py). τ is ``kl.kd_temperature``.

``run_kl`` starts from the previous stage's student (``<run_dir>/align/student``, or ``kl.init``), reports
held-out KL per language and per family before and after, and the equity score of the KL (variance of the
family means) to ``kl_report.json``. Sampling can be balanced by language or by family (``data.language_temperature``,
``kl.balance``: ``family_balanced_probs``); ``kl.dro`` turns on group-DRO over language families
(``FamilyDRO``: weights identical on every process, the per-family KL is all-reduced before each
exponentiated-gradient step).

With ``kl.cache=FOLDER`` stage 2 trains from an offline teacher cache (``aetheris.teacher_cache``: top-k
log-probs per position) without loading the teacher; the loss is the top-k approximation of forward KL
(exact at ``kl.cache_k`` = vocab). A folder that does not exist yet is written first from this config (the
teacher runs once over exactly the rows the run will consume, then is dropped); an existing one must have
been built from the same teacher, tokenizer, seq_len, data settings, k and temperature (else a clear error).

Documents packed in a row are kept apart: the student resets its state at each document (``doc_ids``) and
the teacher attends within each document only (``teacher.teacher_logits``); a teacher that cannot is
refused when ``data.pack`` is true (``teacher.check_documents_kept_apart``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import Tensor

from aetheris.checkpoint import load_model
from aetheris.config_io import to_dict
from aetheris.data import StreamingDocs, language_weights
from aetheris.distill.common import (check_same_vocabulary, device_and_rank, heldout_kl, load_teacher_model,
                                     previous_student, report_rows, write_stage)
from aetheris.distill.config import DistillConfig
from aetheris.equity import des, group_means
from aetheris.languages import group_of
from aetheris.losses import CACHE_KEYS, group_weighted_mean, teacher_divergence, token_mean, valid_positions
from aetheris.teacher import check_documents_kept_apart, load_teacher_config, teacher_logits
from aetheris.teacher_cache import (CacheMismatchError, CacheStream, check_cache, load_heldout, vocab_hash,
                                    write_cache)
from aetheris.tokenizer import load_tokenizer
from aetheris.train import RunConfig, TrainData, build_data, multi_process_cpu, rows_per_run, train


def family_balanced_probs(stream, temperature: float) -> np.ndarray:
    """Language sampling probabilities balanced by family: p_f ∝ n_f^(1/temperature) over families, then
    proportional to size within a family (n = tokens, or a stream's stand-in weight)."""
    sizes = {lang: len(d) if isinstance(d, StreamingDocs) else sum(len(x) for x in d) for lang, d in stream.docs.items()}
    fam_sizes: dict[str, int] = {}
    for lang, n in sizes.items():
        fam_sizes[group_of(lang)] = fam_sizes.get(group_of(lang), 0) + n
    fam_w = language_weights(fam_sizes, temperature)
    probs = np.array([fam_w[group_of(lang)] * sizes[lang] / fam_sizes[group_of(lang)] for lang in stream.languages])
    return probs / probs.sum()


def family_summary(per_language: dict[str, float]) -> dict:
    """Per-family mean of a per-language KL and its equity score (DES: population variance of the family
    means; the teacher's KL to itself is 0, so the KL is the drop)."""
    fam = group_means(per_language, "family")
    worst = max(fam, key=fam.get) if fam else None
    return {"per_family": fam, "des": des(per_language, "family") if fam else float("nan"), "worst_family": worst,
            "max_min_gap": (max(fam.values()) - min(fam.values())) if fam else float("nan")}


class FamilyDRO:
    """Group-DRO weights over language families (the online algorithm of Sagawa et al. 2020, ICLR).

    The loss of a step weights each family's token-mean KL by ``q_f``. ``KL_f`` is the family's mean over
    the whole global batch: the loss reports per-family KL sums and token counts, and the training loop
    all-reduces every metric across micro-batches and processes before the hooks run, so every process
    takes the same step and holds identical weights (2 processes == 1 process with grad_accum 2). The
    weights used at step s therefore come from steps < s. Saved in checkpoints (``train(stateful=...)``).

    Two update rules, after each optimizer step:

    - ``ema=0`` (plain): ``q_f <- q_f·exp(step·KL_f)`` for the families present in the step, renormalised.
      Every update raises a present family's weight, so a family that is in most batches (a large one
      under proportional sampling) gains weight from being frequent, not from being worse, and a family
      seen in one small batch moves on one noisy estimate.
    - ``ema>0`` (stabilised): each present family updates its running mean ``m_f <- (1-ema)·m_f +
      ema·KL_f`` (its first observation sets it), then **every family seen so far** takes
      ``q_f <- q_f·exp(step·m_f)``, renormalised: each family moves once per step whether or not it was
      sampled, by a smoothed estimate of its KL, so the weights follow which families are worse.
    """

    def __init__(self, families: list[str], step: float, ema: float = 0.0):
        if not 0.0 <= ema <= 1.0:
            raise ValueError(f"kl.dro_ema={ema}: the running-mean rate must be in [0, 1] (0 = the plain update)")
        self.families, self.step, self.ema = list(families), step, ema
        self.q = torch.full((len(families),), 1.0 / len(families))
        self.mean = torch.zeros(len(families), dtype=torch.float64)   # running mean KL per family (ema > 0)
        self.seen = torch.zeros(len(families), dtype=torch.bool)

    def update(self, record: dict) -> None:
        """The exponentiated-gradient step from a training record (the hook ``train.train`` calls)."""
        sums = torch.tensor(record["family_kl_sum"], dtype=torch.float64)
        counts = torch.tensor(record["family_tokens"], dtype=torch.float64)
        present = counts > 0
        means = sums / counts.clamp_min(1e-12)
        if self.ema > 0:
            rate = torch.where(self.seen, torch.full_like(means, self.ema), torch.ones_like(means))
            self.mean = torch.where(present, (1 - rate) * self.mean + rate * means, self.mean)
            self.seen = self.seen | present
            means, present = self.mean, self.seen
        q = torch.where(present, self.q.double() * torch.exp(self.step * means), self.q.double())
        self.q = (q / q.sum()).float()

    def state_dict(self) -> dict:
        return {"q": self.q.tolist(), "families": self.families, "mean": self.mean.tolist(), "seen": self.seen.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("families", self.families) != self.families:
            raise ValueError(f"the checkpoint's DRO families {state['families']} differ from this run's {self.families}")
        self.q = torch.tensor(state["q"], dtype=torch.float32)
        if "mean" in state:  # checkpoints written before the running means carry q only
            self.mean = torch.tensor(state["mean"], dtype=torch.float64)
            self.seen = torch.tensor(state["seen"], dtype=torch.bool)


def make_kd_loss(teacher, *, kind: str, temperature: float, chunk: int, w_kl: float, w_ce: float,
                 lang_family: Tensor | None = None, dro: FamilyDRO | None = None):
    """The loss_fn for ``train.train`` (stages 2 and 3): ``w_kl·τ²·KL + w_ce·CE + aux`` per valid token.

    ``model`` is the module ``train`` prepared with Accelerate (DDP under several processes); the student's
    forward goes through it so its gradients are all-reduced. The teacher runs under no_grad on the same token
    ids -- or, when the batch carries a teacher cache's ``t_values``/``t_ids``/``t_tail``, the KL is the top-k
    approximation against the cache and no teacher is needed (``teacher`` may be None). ``dro`` (a
    ``FamilyDRO``) turns the KL mean into a ``q``-weighted mean of per-family KL means and reports the
    per-family KL sums and token counts its update reads. With neither teacher nor cache the loss is
    ``w_ce·CE + aux`` (SFT without a teacher).
    """

    def kd_loss(model, batch: dict) -> tuple[Tensor, dict]:
        x, labels, doc_ids = batch["input_ids"], batch["labels"], batch.get("doc_ids")
        # Packed documents are kept apart on both sides: the student resets its state at every document
        # (doc_ids), the teacher attends within each document only (``teacher.teacher_logits``).
        out = model(x, labels=labels, doc_ids=doc_ids, attention_mask=batch.get("attention_mask"))
        metrics = {"ce": out.ce_loss.detach(), "aux": out.aux_loss.detach()}
        loss = w_ce * out.ce_loss + out.aux_loss
        cached = CACHE_KEYS[0] in batch
        if (teacher is None and not cached) or w_kl == 0:
            return loss, metrics
        if cached:
            t = {key: batch[key] for key in CACHE_KEYS}
        else:
            with torch.no_grad():
                t = teacher_logits(teacher, x, doc_ids)
        mask = valid_positions(labels)
        per_pos, n = teacher_divergence(t, out.logits, mask, kind, temperature, chunk)             # (B, T)
        metrics["kl"] = token_mean(per_pos, n).detach()
        if dro is None:
            return loss + w_kl * token_mean(per_pos, n, temperature), metrics
        q = dro.q.to(x.device)
        kl_used, means, counts = group_weighted_mean(per_pos, mask, lang_family.to(x.device)[batch["lang_ids"]], q)
        metrics.update(family_kl_sum=(means * counts).detach(), family_tokens=counts.detach(), dro_weights=q.clone())
        return loss + w_kl * temperature ** 2 * kl_used, metrics

    return kd_loss


def cache_ready(cfg: DistillConfig) -> bool:
    """Stage 2 trains from an existing teacher cache (so the teacher need not be loaded)."""
    return bool(cfg.kl.cache) and (Path(cfg.kl.cache) / "cache.json").is_file()


def cache_source(cfg: DistillConfig, teacher_config, tokenizer) -> dict:
    """What a stage-2 teacher cache is built from; a cache is only used by a run whose settings match."""
    name = cfg.teacher.name
    arch = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "logit_scale")
    return {"teacher": str(Path(name).resolve()) if Path(name).is_dir() else name,
            "teacher_config": {key: getattr(teacher_config, key, None) for key in arch},
            "teacher_dtype": str(cfg.teacher.torch_dtype()).removeprefix("torch."),
            "tokenizer_vocab": vocab_hash(tokenizer), "seq_len": cfg.data.seq_len, "data": to_dict(cfg.data),
            "balance": cfg.kl.balance, "seed": cfg.kl.train.seed,
            "documents": "kept apart"}  # caches written before the teacher kept packed documents apart are refused


def prepare_cache(cfg: DistillConfig, teacher, data, tokenizer, teacher_config, rows: dict[str, Tensor], log) -> dict:
    """Write ``kl.cache`` if it does not exist (every process its own shards), then check it against the run:
    recorded settings first, then the held-out rows themselves. Returns the cache's metadata."""
    kc = cfg.kl
    folder = Path(kc.cache)
    source = cache_source(cfg, teacher_config, tokenizer)
    state = PartialState(cpu=multi_process_cpu())  # the process group train() will reuse
    if not (folder / "cache.json").is_file():  # every process writes its share (write_cache waits for all)
        if teacher is None:
            teacher = load_teacher_model(cfg)
        n = kc.cache_rows or rows_per_run(kc.train, state.num_processes)
        log(f"stage 2: writing the teacher cache {folder} ({n} rows of {cfg.data.seq_len} tokens, top-{kc.cache_k}, "
            f"{kc.cache_dtype}, {state.num_processes} process(es)); later runs with this config reuse it without the teacher")
        device = device_and_rank()[0]
        teacher.to(device)
        write_cache(teacher, data.stream, folder, rows=n, k=kc.cache_k, temperature=kc.kd_temperature,
                    dtype=kc.cache_dtype, batch_size=kc.train.micro_batch_size, source=source, heldout=rows,
                    tokenizer_hash=source["tokenizer_vocab"], log=log, rank=state.process_index,
                    world=state.num_processes, barrier=state.wait_for_everyone)
    k = min(kc.cache_k, teacher_config.vocab_size)
    meta = check_cache(folder, {"k": k, "temperature": kc.kd_temperature, "dtype": kc.cache_dtype, **source})
    heldout = load_heldout(folder) or {}
    same = sorted(heldout) == sorted(rows) and all(torch.equal(heldout[lang]["input_ids"], rows[lang]["input_ids"])
                                                   for lang in rows)
    if not same:
        raise CacheMismatchError(f"the teacher cache {folder} holds other held-out rows than this run "
                                 f"(kl.report_rows_per_language={kc.report_rows_per_language}, data settings): point "
                                 "kl.cache at a new folder or delete this one to rebuild it")
    return meta


def run_kl(cfg: DistillConfig, *, teacher=None, resume=None, log=print, hooks=(), overwrite: bool = False) -> dict:
    """Stage 2 end to end; returns the report (also ``<kl out_dir>/kl_report.json``) and writes the student.

    With ``kl.cache`` the teacher is only loaded (here, if not passed) when the cache must be written first.
    """
    kc = cfg.kl
    out_dir = Path(kc.train.out_dir)
    device, main_process = device_and_rank()
    # 1. Starting student (checked before the teacher is read), teacher, one tokenizer, data.
    init = previous_student(cfg, "kl")
    if teacher is None and not kc.cache:
        teacher = load_teacher_model(cfg)
    teacher_config = teacher.config if teacher is not None else load_teacher_config(cfg.teacher.name)
    tokenizer = load_tokenizer(cfg.tokenizer.name or cfg.teacher.name)
    student = load_model(init)
    check_same_vocabulary(teacher_config, student, tokenizer, init)
    run_cfg = RunConfig(model=student.cfg, tokenizer=cfg.tokenizer, data=cfg.data, train=kc.train)
    data, tokenizer = build_data(run_cfg, lambda _docs: tokenizer, log)
    if kc.balance == "family":
        data.stream.set_language_weights(family_balanced_probs(data.stream, cfg.data.language_temperature))
    languages = data.stream.languages
    families = sorted({group_of(lang) for lang in languages})
    lang_family = torch.tensor([families.index(group_of(lang)) for lang in languages])
    dro = FamilyDRO(families, kc.dro_step, kc.dro_ema) if kc.dro else None
    rows = report_rows(data.val, kc.report_rows_per_language)
    if teacher is not None and cfg.data.pack:
        check_documents_kept_apart(teacher)  # packed rows: the teacher must score each document alone
    report: dict[str, Any] = {"teacher": cfg.teacher.name, "init": str(init), "kind": kc.kind,
                              "kd_temperature": kc.kd_temperature, "balance": kc.balance, "dro": kc.dro,
                              "sampling": dict(zip(languages, map(float, data.stream.probs)))}
    if kc.cache:  # the training rows come from the cache, in the order the stream drew them when it was written
        meta = prepare_cache(cfg, teacher, data, tokenizer, teacher_config, rows, log)
        data = TrainData(CacheStream(kc.cache), data.val, data.malformed)
        needed = rows_per_run(kc.train, int(os.environ.get("WORLD_SIZE", "1")))
        log(f"stage 2: training from the teacher cache {kc.cache} (top-{meta['k']}, {meta['rows']} rows; this run "
            f"consumes {needed}" + (f", so it cycles over the cache {needed / meta['rows']:.1f} times)" if needed > meta["rows"] else ")"))
        heldout = load_heldout(kc.cache)
        teacher = None  # not needed any more: every teacher number comes from the cache
        report["cache"] = {"folder": str(kc.cache), "k": meta["k"], "rows": meta["rows"], "dtype": meta["dtype"],
                           "kl_measure": "top-k approximation (exact at k = vocab size)"}
    else:
        heldout = None

    def measure(student):
        return heldout_kl(teacher, student, rows, chunk=kc.chunk, cache=heldout)

    # 2. Before: the previous stage's student against the teacher on held-out text.
    if teacher is not None:
        teacher.to(device)
    student.to(device).eval()
    report["kl_before"] = measure(student)
    report["equity_before"] = family_summary(report["kl_before"]["per_language"])

    # 3. Train every parameter through the shared loop.
    loss_fn = make_kd_loss(teacher, kind=kc.kind, temperature=kc.kd_temperature, chunk=kc.chunk, w_kl=kc.w_kl,
                           w_ce=kc.w_ce, lang_family=lang_family, dro=dro)
    result = train(run_cfg, loss_fn=loss_fn, model=student, tokenizer=tokenizer, data=data,
                   frozen={"teacher": teacher} if teacher is not None else None, resume=resume, overwrite=overwrite,
                   hooks=[dro.update, *hooks] if dro is not None else hooks,
                   stateful={"dro": dro} if dro is not None else None)
    student = result.model.eval()

    # 4. After, per language and per family; the student for stage 3.
    report["kl_after"] = measure(student)
    report["equity_after"] = family_summary(report["kl_after"]["per_language"])
    report["steps"] = result.step
    if dro is not None:
        report["dro_weights"] = dict(zip(families, map(float, dro.q)))
        report["dro_weights_rank_spread"] = _rank_spread(dro.q)
    log(f"stage 2: held-out KL(teacher||student) {report['kl_before']['mean']:.4f} -> {report['kl_after']['mean']:.4f} "
        f"nats/token; family DES {report['equity_before']['des']:.5f} -> {report['equity_after']['des']:.5f}")
    if main_process:
        write_stage(out_dir, "kl", report, student, tokenizer)
    return report


def _rank_spread(q: Tensor) -> float:
    """Largest difference of a tensor across processes (0 in one process): the DRO weights must agree."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, q.tolist())
    stacked = torch.tensor(everyone)
    return float((stacked.max(0).values - stacked.min(0).values).max())
