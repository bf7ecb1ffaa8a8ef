"""Distillation losses: KL / reverse KL / JSD between teacher and student next-token distributions,
masked to valid tokens, computed in sequence chunks; and the top-k approximation used with a teacher cache.

Conventions:
* Logits are (B, T, V); position t predicts token t+1, so the valid positions are those whose *next*
  label is not -100 (``valid_positions``): padding, prompt tokens in SFT and the last position never count.
* Every loss is a **per-token mean over valid positions** — a sum over positions divided by their number,
  never ``batchmean`` over sequences (which divides a (B, T, V) sum by B).
* ``temperature`` τ softens both distributions; the divergence is multiplied by τ² (Hinton et al. 2015) so
  its gradient scale does not shrink as τ grows.
* With a 262,144-token vocabulary one position's fp32 distribution is 1 MiB. ``chunked_divergence`` never
  upcasts the whole (B, T, V) logits: one autograd function (``_ChunkedDivergence``) walks the valid
  positions a block of rows at a time (at most ``chunk``; on a CPU few enough that a block's fp32 rows stay
  in cache), computes each row's divergence with fused fp32 softmax kernels and in-place ops, and saves
  nothing per row for forward KL (the divergence for reverse/JSD). Its backward recomputes the block's two
  softmaxes from the logits and writes the closed-form gradient (forward KL: (softmax(s/τ) - softmax(t/τ))
  / τ) straight into the student logits' gradient: no log-softmax is saved, no autograd graph is built over
  (chunk, V) tensors, masked positions cost nothing. Extra memory is O(block · V) plus the (B, T, V)
  gradient any loss has. ``token_divergence`` is the reference formula the tests hold it to.

Kinds: ``forward`` KL(p_T || p_S) (mode-covering; the default, as in Hinton/torchtune), ``reverse``
KL(p_S || p_T) (mode-seeking, MiniLLM), ``jsd`` 0.5·KL(p_T||M) + 0.5·KL(p_S||M) with M = (p_T + p_S)/2.

Top-k cache approximation (``topk_kl``): the teacher's distribution is kept as its k largest log-probs plus
the remaining mass r = 1 - Σ_top-k p_T. The student's distribution is collapsed onto the same k+1 buckets
(the k tokens, and "everything else" with mass 1 - Σ_top-k q_S), and KL is taken between the two (k+1)-way
distributions. This is a lower bound on the full KL (the data-processing inequality: merging outcomes can
only lose divergence) and equals it when k = V (r = 0).

``teacher_divergence`` is the one entry point for a teacher given as logits or as a cache batch: the KD loss
that trains (``distill.kd.make_kd_loss``: ``teacher_divergence`` + ``token_mean``, or ``group_weighted_mean``
under group-DRO), every stage report's held-out KL (``distill.common.heldout_kl``) and the ``ppl`` task's KL
(``tasks.perplexity.kl_per_sequence``) all call it, so they compute one quantity.

The model never imports this file (STYLE: imports point one way; training imports model + losses).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from aetheris.model import IGNORE_INDEX
KINDS = ("forward", "reverse", "jsd")


def valid_positions(labels: Tensor) -> Tensor:
    """(B, T) labels -> (B, T) bool: positions whose next-token label is real (the last position never is)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def token_divergence(t_logits: Tensor, s_logits: Tensor, kind: str = "forward", temperature: float = 1.0) -> Tensor:
    """Per-position divergence (..., V) x (..., V) -> (...), in nats, in fp32, at temperature τ (without τ²)."""
    t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    if kind == "forward":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([t, s]), dim=0) - torch.log(torch.tensor(2.0, device=t.device))
        return 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(KINDS)}")


# fp32 elements of one block of rows: 1 Mi elements = 4 MiB, so a block and the one or two temporaries made
# from it stay in L2/L3 between the passes over it (a fresh (256, 262144) fp32 tensor per op, as a plain
# autograd formula makes, spends most of its time on page faults and memory traffic).
_BLOCK_ELEMENTS = 1 << 20
_LOG2 = 0.6931471805599453


def _scaled_rows(logits: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """Rows ``rows`` of 2-D ``logits`` divided by τ (a copy; fp32 when τ != 1, else the logits' dtype: the
    softmax kernels below read bf16 and compute in fp32 without a separate upcast pass)."""
    z = logits.index_select(0, rows)
    return z.float().div_(temperature) if temperature != 1.0 else z


def _log_softmax(z: Tensor) -> Tensor:
    return torch.log_softmax(z, -1, dtype=torch.float32)


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device):
    """Run the block loop on one thread on a CPU: each op on a 4-row block is ~0.1 ms of work, less than what
    an OpenMP parallel region costs when other processes hold the cores (measured: ~8 ms per op with two
    threads on two busy cores, whatever the op). The previous thread count is restored afterwards."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _log_mixture(lt: Tensor, ls: Tensor) -> Tensor:
    """log((p + q) / 2) from log p and log q, fresh tensor."""
    return torch.logaddexp(lt, ls).sub_(_LOG2)


def _forward_blocks(t2, s2, rows, kind, temperature, block, div, extra) -> None:
    """Fill ``div`` (N,) with each row's divergence and ``extra`` (N, 1) with JSD's KL(q || m), block by block."""
    for i in range(0, rows.numel(), block):
        r = rows[i:i + block]
        lt = _log_softmax(_scaled_rows(t2, r, temperature))
        ls = _log_softmax(_scaled_rows(s2, r, temperature))
        if kind == "forward":      # Σ p (log p - log q)
            div[i:i + block] = lt.exp().mul_(lt.sub_(ls)).sum(-1)
        elif kind == "reverse":    # Σ q (log q - log p)
            div[i:i + block] = ls.exp().mul_(ls.sub_(lt)).sum(-1)
        else:                      # ½ Σ p (log p - log m) + ½ Σ q (log q - log m)
            lm = _log_mixture(lt, ls)
            kl_pm = lt.exp().mul_(lt.sub(lm)).sum(-1)
            kl_qm = ls.exp().mul_(ls.sub_(lm)).sum(-1)
            div[i:i + block] = 0.5 * (kl_pm + kl_qm)
            extra[i:i + block, 0] = kl_qm


def _backward_blocks(t2, s2, rows, kind, tau, block, extra, scale, grad) -> None:
    """Write each row's gradient (closed form, times ``scale`` = upstream gradient / τ) into ``grad``'s row."""
    for i in range(0, rows.numel(), block):
        r, sl = rows[i:i + block], slice(i, i + block)
        zt, zs = _scaled_rows(t2, r, tau), _scaled_rows(s2, r, tau)
        if kind == "forward":      # q - p
            g = torch.softmax(zs, -1, dtype=torch.float32).sub_(torch.softmax(zt, -1, dtype=torch.float32))
        else:
            lt, ls = _log_softmax(zt), _log_softmax(zs)
            if kind == "reverse":  # q (log q - log p - KL)
                g = ls.exp().mul_(ls.sub_(lt).sub_(extra[sl]))
            else:                  # ½ q (log q - log m - KL(q||m))
                lm = _log_mixture(lt, ls)
                g = ls.exp().mul_(ls.sub_(lm).sub_(extra[sl])).mul_(0.5)
        grad.index_copy_(0, r, g.mul_(scale[sl]).to(grad.dtype))


class _ChunkedDivergence(torch.autograd.Function):
    """Per-position divergence (N,) of the rows ``rows`` of 2-D teacher / student logits (N_all, V), with its
    gradient to the student logits in closed form (see the module docstring), recomputed block by block in
    backward from the logits themselves. Saves per row only what the gradient needs besides the logits:
    nothing for forward KL; the divergence for reverse KL; KL(q || m) for JSD."""

    @staticmethod
    def forward(ctx, t2: Tensor, s2: Tensor, rows: Tensor, kind: str, temperature: float, block: int) -> Tensor:
        n = rows.numel()
        div = torch.empty(n, dtype=torch.float32, device=s2.device)
        extra = div.new_empty(n, 1)  # reverse: the divergence; JSD: KL(q || m)
        with _one_thread_on_cpu(s2.device):
            _forward_blocks(t2, s2, rows, kind, temperature, block, div, extra)
        if kind == "reverse":
            extra[:, 0] = div
        ctx.save_for_backward(t2, s2, rows, extra)
        ctx.kind, ctx.temperature, ctx.block = kind, temperature, block
        return div

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_div: Tensor):
        t2, s2, rows, extra = ctx.saved_tensors
        kind, tau, block = ctx.kind, ctx.temperature, ctx.block
        grad = torch.zeros_like(s2)
        scale = grad_div.float().unsqueeze(-1) / tau  # (N, 1): d/ds = d/dz / τ
        with _one_thread_on_cpu(s2.device):
            _backward_blocks(t2, s2, rows, kind, tau, block, extra, scale, grad)
        return None, grad, None, None, None, None


def chunked_divergence(t_logits: Tensor, s_logits: Tensor, mask: Tensor, kind: str = "forward",
                       temperature: float = 1.0, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Masked divergence over (B, T, V) logits, at most ``chunk`` positions at a time.

    Returns (per-position divergence (B, T) with zeros at masked positions, number of valid positions).
    The teacher's logits are detached. Gradients flow to the student's logits only. Equals
    ``token_divergence`` at the valid positions (the tests hold it to that in fp32 and bf16).
    """
    if t_logits.shape != s_logits.shape:
        raise ValueError(f"teacher logits {tuple(t_logits.shape)} and student logits {tuple(s_logits.shape)} differ: "
                         "teacher and student must share one tokenizer (same vocabulary)")
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(KINDS)}")
    V = s_logits.shape[-1]
    rows = mask.reshape(-1).nonzero().squeeze(1)                          # valid positions of (B*T)
    # On a CPU small blocks stay in cache; a GPU wants large kernels, so it takes ``chunk`` rows at a time.
    block = max(1, min(chunk, _BLOCK_ELEMENTS // V)) if s_logits.device.type == "cpu" else max(1, chunk)
    div = _ChunkedDivergence.apply(t_logits.detach().reshape(-1, V), s_logits.reshape(-1, V), rows, kind,
                                   float(temperature), block)             # (N,)
    per_pos = div.new_zeros(mask.numel()).index_put((rows,), div)         # zeros at masked positions
    return per_pos.view(mask.shape), mask.sum()


def token_mean(per_pos: Tensor, n: Tensor, temperature: float = 1.0) -> Tensor:
    """τ² · per-token mean of a masked per-position divergence (``chunked_divergence``'s output): sum / count."""
    return temperature ** 2 * per_pos.sum() / n.clamp_min(1)


def distill_loss(t_logits: Tensor, s_logits: Tensor, labels: Tensor, kind: str = "forward",
                 temperature: float = 1.0, chunk: int = 256) -> Tensor:
    """τ² · mean over valid positions of the divergence: the KD term of stage 2 (and of stage 3's β·KL)."""
    per_pos, n = chunked_divergence(t_logits, s_logits, valid_positions(labels), kind, temperature, chunk)
    return token_mean(per_pos, n, temperature)


# ----------------------------------------------------------------------------------------------
# Top-k teacher cache


def topk_teacher(t_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher logits (..., V) -> (top-k log-probs (..., k) fp32, their token ids (..., k), tail log-mass (...))
    at temperature τ: what the cache stores per position."""
    logp = F.log_softmax(t_logits.float() / temperature, dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    tail = torch.log1p(-values.exp().sum(-1).clamp(max=1.0)).clamp_min(-1e4)  # log r; -1e4 stands for r = 0
    return values, ids, tail


def topk_kl(t_values: Tensor, t_ids: Tensor, t_tail: Tensor, s_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL between the teacher's cached (k+1)-bucket distribution and the student's collapsed onto the same
    buckets, per position (...). Equals the full forward KL when k = V."""
    s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    s_top = s.gather(-1, t_ids.long())                                         # (..., k)
    s_tail = torch.log1p(-s_top.exp().sum(-1).clamp(max=1.0 - 1e-7))          # log(1 - Σ q_top)
    p_top = t_values.exp()
    kl = (p_top * (t_values - s_top)).sum(-1)
    r = t_tail.exp()
    return kl + torch.where(r > 0, r * (t_tail - s_tail), torch.zeros_like(r))


def chunked_topk_divergence(t_values: Tensor, t_ids: Tensor, t_tail: Tensor, s_logits: Tensor, mask: Tensor,
                            temperature: float = 1.0, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """``topk_kl`` against a cached teacher, ``chunk`` positions at a time, masked: (per-position (B, T) with
    zeros at masked positions, number of valid positions) — the cache's counterpart of ``chunked_divergence``."""
    need_grad = s_logits.requires_grad and torch.is_grad_enabled()
    pieces = []
    for c in range(0, s_logits.shape[1], chunk):
        args = (t_values[:, c:c + chunk].float(), t_ids[:, c:c + chunk], t_tail[:, c:c + chunk].float(),
                s_logits[:, c:c + chunk], temperature)
        d = checkpoint(topk_kl, *args, use_reentrant=False) if need_grad else topk_kl(*args)
        pieces.append(torch.where(mask[:, c:c + chunk], d, torch.zeros_like(d)))
    return torch.cat(pieces, dim=1), mask.sum()


def cached_distill_loss(t_values: Tensor, t_ids: Tensor, t_tail: Tensor, s_logits: Tensor, labels: Tensor,
                        temperature: float = 1.0, chunk: int = 256) -> Tensor:
    """τ² · mean over valid positions of ``topk_kl`` (teacher from a cache, no teacher model)."""
    per_pos, n = chunked_topk_divergence(t_values, t_ids, t_tail, s_logits, valid_positions(labels), temperature, chunk)
    return token_mean(per_pos, n, temperature)


# ----------------------------------------------------------------------------------------------
# One entry point for every teacher-vs-student measure


CACHE_KEYS = ("t_values", "t_ids", "t_tail")


def teacher_divergence(teacher: Tensor | dict, s_logits: Tensor, mask: Tensor, kind: str = "forward",
                       temperature: float = 1.0, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Masked per-position divergence of the student from a teacher given either as logits (B, T, V)
    (``chunked_divergence``) or as a teacher cache's batch, a mapping holding ``CACHE_KEYS``
    (``chunked_topk_divergence``: forward KL only): ((B, T) with zeros at masked positions, valid count).

    The training loss of stages 2 and 3, the held-out KL of every stage report and the ``ppl`` task's
    per-sentence KL all go through here, so they measure one quantity."""
    if isinstance(teacher, Tensor):
        return chunked_divergence(teacher, s_logits, mask, kind, temperature, chunk)
    if kind != "forward":
        raise ValueError(f"a top-k teacher cache supports forward KL only, not {kind!r}")
    t_values, t_ids, t_tail = (teacher[key] for key in CACHE_KEYS)
    return chunked_topk_divergence(t_values, t_ids, t_tail, s_logits, mask, temperature, chunk)


def per_group_mean(per_pos: Tensor, mask: Tensor, group_ids: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group token-mean of a (B, T) per-position quantity: (n_groups,) means and (n_groups,) counts
    (groups absent from the batch have mean 0, count 0). Used by group-DRO over language families."""
    g = group_ids.long().clamp_min(0)
    sums = per_pos.new_zeros(n_groups).index_add(0, g[mask], per_pos[mask].float())
    counts = per_pos.new_zeros(n_groups).index_add(0, g[mask], torch.ones_like(per_pos[mask], dtype=torch.float32))
    return sums / counts.clamp_min(1), counts


def group_weighted_mean(per_pos: Tensor, mask: Tensor, group_ids: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group-DRO's objective: the ``q``-weighted mean of per-group token-means over the groups present in the
    batch (``q`` renormalised over them). Returns (that mean, per-group means, per-group counts)."""
    means, counts = per_group_mean(per_pos, mask, group_ids, q.numel())
    w = q * (counts > 0)
    return (w / w.sum().clamp_min(1e-12) * means).sum(), means, counts
