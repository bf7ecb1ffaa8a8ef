"""Selective state-space ops for the Mamba-2 (SSD) mixer: chunked scan, sequential reference, one step.

The recurrence, per head h (state ``S`` is P × N):

    a_t = exp(dt_t · A_h)                       scalar decay per head and step
    S_t = a_t · S_{t-1} + dt_t · x_t ⊗ B_t       x_t ∈ R^P, B_t ∈ R^N
    y_t = S_t · C_t                              C_t ∈ R^N  (D·x skip is added by the mixer)

x and B come in G groups shared by R = H / G heads each (head h reads group h // R), exactly how
grouped-query attention shares K/V: that is what lets C <- W_Q, B <- W_K and x <- W_V.

``ssd_chunked`` is the training/prefill path (Dao & Gu 2024, "Transformers are SSMs", §6: the SSD
algorithm): quadratic attention-like work inside chunks of length L, a linear recurrence across
chunks, so O(T·L) overall — linear in T. ``ssd_reference`` is the plain loop it is tested against;
``ssd_step`` is one loop iteration, used for O(1)-per-token decoding.

Packed sequences: ``seg`` (B, T) holds a segment index that increases by one at each document start;
the state is reset there (no information crosses a boundary).

Shapes: B batch, T time, H heads, G groups, R = H/G heads per group, P head dim, N state size,
c number of chunks, L chunk length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def segment_index(doc_ids: Tensor) -> Tensor:
    """(B, T) document ids -> (B, T) segment index that grows by 1 wherever the id changes."""
    change = torch.zeros_like(doc_ids, dtype=torch.long)
    change[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    return change.cumsum(1)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
                seg: Tensor | None = None, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan.

    x (B, T, G, P), dt (B, T, H), A (H,) negative, B (B, T, G, N), C (B, T, H, N),
    seg (B, T) non-decreasing segment index (``segment_index``) or None, initial_state (B, H, P, N) or None.
    Returns y (B, T, H, P) in x's dtype and the final state (B, H, P, N) in the scan's own dtype (fp32, or
    wider for wider x): the state is carried into decoding, where a bf16 rounding would persist.

    Here the inputs are padded, x, B and dt laid out chunk-major and the decays summed;
    ``_ChunkScan`` does the scan itself, in blocks of chunks, with a hand-written backward. Every
    matmul is one ``bmm`` over a batch of (chunk, batch, group) rows whose matrices stack the R heads
    of a group ((R*L) x L, (R*P) x L): x and B are read once per group, not once per head, and the
    GEMMs are R times taller than per-head ones (twice as fast on CPU at L = 64).
    """
    b, T, G, P = x.shape
    H, N = dt.shape[-1], B.shape[-1]
    R = H // G
    L = chunk_size
    dtype = x.dtype
    # The decays are exponentials of cumulative sums: do this math in (at least) fp32.
    f = torch.promote_types(dtype, torch.float32)
    x, dt, B, C, A = x.to(f), dt.to(f), B.to(f), C.to(f), A.to(f)

    # 0. Pad T up to a multiple of L. Padded steps have dt = 0 and x = 0: no decay, no input.
    pad = (-T) % L
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)
    c = (T + pad) // L
    M = c * b * G                                                          # bmm batch: (chunk, batch, group)

    # 1. Chunk-major copies: row (k, b, g) holds chunk k of group g; the heads of a group stack on rows.
    # Chunk-major keeps each chunk's states contiguous for the recurrence across chunks (step 4).
    xT = x.reshape(b, c, L, G, P).permute(1, 0, 3, 4, 2).reshape(M, P, L).contiguous()  # (M, P, L), x transposed
    Bg = B.reshape(b, c, L, G, N).permute(1, 0, 3, 2, 4).reshape(M, L, N).contiguous()  # (M, L, N)
    dtg = dt.reshape(b, c, L, G, R).permute(1, 0, 3, 4, 2).reshape(M, R, L).contiguous()  # (M, R, L)
    A_cum = (dtg.view(c, b, G, R, L) * A.view(G, R, 1)).cumsum(-1).view(M, R, L)  # log-decay from chunk start

    if seg is not None:  # masks broadcast over (group, head): shapes (c, b, 1, 1, ...)
        segc = seg.view(b, c, L).transpose(0, 1)                          # (c, b, L)
        same_doc = (segc[..., :, None] == segc[..., None, :])[:, :, None, None].to(f)  # (l, s) in one document
        # Inputs at s reach the chunk's final state only if s is in the chunk's last segment.
        keep_state = (segc == segc[..., -1:])[:, :, None, None].to(f)
        # Segment of the step just before each chunk (an initial state belongs to segment seg[:, 0]).
        prev_last = torch.cat([segc[:1, :, :1], segc[:-1, :, -1:]], dim=0)  # (c, b, 1)
        keep_carry = (segc == prev_last)[:, :, None, None].to(f)          # carried state visible at l
        keep_chunk = keep_carry[..., -1]                                  # (c, b, 1, 1): no document starts in chunk
    else:
        same_doc, keep_state, keep_carry, keep_chunk = None, None, None, None

    S0 = initial_state.to(f) if initial_state is not None else None
    C6 = C.reshape(b, c, L, G, R, N)                                      # blocks copy their own chunks
    y, S = _ChunkScan.apply(xT, Bg, C6, dtg, A_cum, S0, same_doc, keep_state, keep_carry, keep_chunk)
    y = y.view(b, c * L, H, P)[:, :T]                                       # head = g*R + r
    return y.to(dtype), S


def _rowdot(u: Tensor, v: Tensor) -> Tensor:
    """sum(u * v, -1) for same-shape contiguous tensors, without the full-size product."""
    k = u.shape[-1]
    return torch.bmm(u.reshape(-1, 1, k), v.reshape(-1, k, 1)).view(u.shape[:-1])


# On CPU, chunks go through steps 2-5 in blocks whose (rows, R, L, L) products take about this many
# bytes, so each block's intermediates are still in cache when the next op reads them (0.5-1 MiB was
# fastest at T = 4096; 4 MiB took 1.3x as long).
_BLOCK_BYTES = 1 << 20

# Inside a chunk, exp(A_l - A_s) factors into exp(A_l - mid) * exp(mid - A_s), mid halfway between the
# chunk's first and last A_cum: 2L exps per chunk and head instead of L*L (exp is the costliest
# elementwise op here, ~5 % of forward+backward). Each factor lies within exp(+-span/2), span the chunk's
# total log-decay; below this span both stay normal fp32 numbers, so the product keeps fp32 precision.
# A call with any chunk at or above it computes exp(A_l - A_s) directly.
_FACTORED_SPAN = 150.0


class _ChunkScan(torch.autograd.Function):
    """Steps 2-5 of the chunked scan on chunk-major inputs, with a hand-written backward.

    Forward and backward walk the chunks in cache-sized blocks (backward in reverse: the state
    gradient flows from the last chunk to the first). None of the per-head (L x L) products is kept
    between them: backward recomputes a block's products from its inputs while they are in cache, as
    FlashAttention does, so the scan keeps its inputs, the chunk states, per-step decays and the
    per-chunk document mask (autograd through the same ops kept four (L x L) products per head and
    re-read each from memory). The decay gradients come from one product, dW * C.B * E, and the GEMM
    gradients accumulate in place. Always fp32 math, autocast or not (a bf16 bmm output would meet
    fp32 operands in the in-place ``baddbmm_``). Tested against the sequential loop and by gradcheck;
    speed in docs/BENCHMARKS.md.

    Inputs: xT (M, P, L), Bg (M, L, N), dtg (M, R, L), A_cum (M, R, L) with M = c * B * G rows in
    (chunk, batch, group) order, so a range of chunks is a range of rows; C (B, c, L, G, R, N) in the
    caller's layout: each block copies its own chunks of C into row order and writes its y back into
    (B, c, L, G, R, P), in cache, instead of whole-sequence transposing copies of C and y (and of their
    gradients). S0 (B, H, P, N) or None; masks from ``ssd_chunked``. Returns y and the final state.
    """

    @staticmethod
    def forward(ctx, xT, Bg, C, dtg, A_cum, S0, same_doc, keep_state, keep_carry, keep_chunk):
        with torch.autocast(xT.device.type, enabled=False):
            return _ChunkScan._forward(ctx, xT, Bg, C, dtg, A_cum, S0, same_doc, keep_state, keep_carry, keep_chunk)

    @staticmethod
    def _forward(ctx, xT, Bg, C, dtg, A_cum, S0, same_doc, keep_state, keep_carry, keep_chunk):
        b, c, L, G, R, N = C.shape
        M, P, _ = xT.shape
        bH = b * G * R
        # Per-step decay weights (small): into the chunk's final state, across chunks, from the carried state.
        e_state = torch.exp(A_cum[..., -1:] - A_cum)                      # (M, R, L)
        if keep_state is not None:  # inputs reach the final state only from the chunk's last document
            e_state.view(c, b, G, R, L).mul_(keep_state)
        w_state = e_state * dtg                                           # (M, R, L)
        a = torch.exp(A_cum[..., -1]).view(c, bH)                         # (c, B*H): decay across chunk k
        if keep_chunk is not None:  # a document starting inside chunk k cuts off what came before it
            a = (a.view(c, b, G * R) * keep_chunk.view(c, b, 1)).view(c, bH)
        w_off = torch.exp(A_cum)                                          # (M, R, L)
        if keep_carry is not None:
            w_off.view(c, b, G, R, L).mul_(keep_carry)
        factored = float((A_cum[..., 0] - A_cum[..., -1]).max()) < _FACTORED_SPAN

        y = xT.new_empty(b, c, L, G, R, P)
        S = xT.new_empty(c + 1, bH, P, N)                                 # S[k] enters chunk k
        if S0 is None:
            S[0].zero_()
        else:
            S[0] = S0.reshape(bH, P, N)
        S_k, a_k = S.unbind(0), a[:, :, None, None].unbind(0)              # views made once, not per step
        for k0, k1, rows in _blocks(xT, c, b * G, R * L * L):
            m = rows.stop - rows.start
            C_b = _rows_of(C, k0, k1)                                     # (m, R, L, N)
            # 2. Inside each chunk: y_l = sum_{s<=l} W[l, s] x_s.
            same_doc_b = None if same_doc is None else same_doc[k0:k1]
            W, _, _ = _decay_products(C_b, Bg[rows], A_cum[rows], dtg[rows], same_doc_b, b, G, factored)
            y_b = torch.bmm(W.view(m, R * L, L), xT[rows].transpose(1, 2))  # (m, R*L, P)
            # 3. Each chunk's own contribution to the state at its end: (R*P, L) @ (L, N) per group.
            xw = xT[rows, None] * w_state[rows, :, None, :]               # (m, R, P, L)
            states = torch.bmm(xw.view(m, R * P, L), Bg[rows]).view(k1 - k0, bH, P, N)
            # 4. Across chunks: S[k+1] = a_k S[k] + states_k.
            for k, state_k in enumerate(states.unbind(0), start=k0):
                torch.addcmul(state_k, a_k[k], S_k[k], out=S_k[k + 1])
            # 5. Carried-in state to outputs: y_l += exp(A_cum_l) * (C_l . S[k]), per head.
            Cw = C_b.mul_(w_off[rows, ..., None])                         # (m, R, L, N)
            y_b.view(m * R, L, P).baddbmm_(Cw.view(m * R, L, N), S[k0:k1].view(m * R, P, N).transpose(1, 2))
            y[:, k0:k1] = y_b.view(k1 - k0, b, G, R, L, P).permute(1, 0, 4, 2, 3, 5)

        ctx.has_S0, ctx.factored = S0 is not None, factored
        ctx.save_for_backward(xT, Bg, C, dtg, A_cum, e_state, w_state, a, S, w_off, same_doc)
        return y, S[c].view(b, G * R, P, N).clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dS):
        # Derivatives used below: W = C.B * exp(A_cum_l - A_cum_s) * dt_s gives dW/dA_cum_l = W and
        # dW/dA_cum_s = -W; every exp(A_cum ...) weight w likewise has dw/dA_cum = +-w.
        xT, Bg, C, dtg, A_cum, e_state, w_state, a, S, w_off, same_doc = ctx.saved_tensors
        b, c, L, G, R, N = C.shape
        M, P, _ = xT.shape
        bH = b * G * R
        with torch.autocast(xT.device.type, enabled=False):
            # Gradient buffers start empty: in each block the first write to a slice is an out= or a copy,
            # later terms add to it (so the order of the writes below matters).
            dxT, dBg, dC = torch.empty_like(xT), torch.empty_like(Bg), torch.empty_like(C)
            d_dt, dA_cum = torch.empty_like(dtg), torch.empty_like(dtg)                  # (M, R, L)
            dA_last = a.new_empty(c, bH)                                                # (c, B*H)
            dS_all = S.new_empty(c + 1, bH, P, N)                                       # gradient of S[k]
            dS_all[c] = dS.reshape(bH, P, N)
            dS_k, a_k = dS_all.unbind(0), a[:, :, None, None].unbind(0)
            for k0, k1, rows in reversed(list(_blocks(xT, c, b * G, R * L * L))):
                m, nk = rows.stop - rows.start, k1 - k0
                dt_b, x_b, B_b, dA_b = dtg[rows], xT[rows], Bg[rows], dA_cum[rows]
                dy_b, C_b = _rows_of(dy, k0, k1).view(m, R * L, P), _rows_of(C, k0, k1)
                # 5. y += Cw @ S[k]^T, Cw = C * w_off.
                Cw = (C_b * w_off[rows, ..., None]).view(m * R, L, N)
                dCw = torch.bmm(dy_b.view(m * R, L, P), S[k0:k1].view(m * R, P, N))         # (m*R, L, N)
                dS_in = torch.bmm(dy_b.view(m * R, L, P).transpose(1, 2), Cw).view(nk, bH, P, N)
                dA_b.view(m * R * L).copy_(_rowdot(dCw, Cw).view(-1))                       # via w_off
                dC_b = dCw.mul_(w_off[rows].view(m * R, L, 1))                              # dC's first term
                # 4. Reverse recurrence: dS[k] = dS_in[k] + a_k dS[k+1]; dS[k+1] is chunk k's states' gradient.
                for k, dS_in_k in reversed(list(enumerate(dS_in.unbind(0), start=k0))):
                    torch.addcmul(dS_in_k, a_k[k], dS_k[k + 1], out=dS_k[k])
                dstates = dS_all[k0 + 1:k1 + 1]                                             # (nk, B*H, P, N)
                dA_last[k0:k1] = _rowdot(dstates.reshape(nk * bH, P * N), S[k0:k1].reshape(nk * bH, P * N)).view(
                    nk, bH) * a[k0:k1]                                                      # da_k * a_k
                # 3. states = (x * w_state) @ B.
                dstates = dstates.view(m, R * P, N)
                xw = x_b[:, None] * w_state[rows, :, None, :]                               # (m, R, P, L)
                dxw = torch.bmm(dstates, B_b.transpose(1, 2)).view(m, R, P, L)
                torch.bmm(xw.view(m, R * P, L).transpose(1, 2), dstates, out=dBg[rows])
                torch.sum(dxw * w_state[rows, :, None, :], dim=1, out=dxT[rows])
                dw_state = dxw.mul_(x_b[:, None]).sum(2)                                    # (m, R, L)
                torch.mul(dw_state, e_state[rows], out=d_dt[rows])
                dlog_w = dw_state.mul_(w_state[rows])                                       # d/d log w_state
                dA_b.sub_(dlog_w)
                dA_last[k0:k1] += dlog_w.sum(-1).view(nk, bH)
                # 2. y = W @ x, W = (C.B) * E * dt, recomputed.
                same_doc_b = None if same_doc is None else same_doc[k0:k1]
                W, Edt, CBE = _decay_products(C_b, B_b, A_cum[rows], dt_b, same_doc_b, b, G, ctx.factored,
                                              for_backward=True)
                dW = torch.bmm(dy_b, x_b)                                                   # (m, R*L, L)
                dxT[rows].baddbmm_(dy_b.transpose(1, 2), W.view(m, R * L, L))
                dCB = Edt.mul_(dW.view(m, R, L, L)).view(m, R * L, L)
                prod = dW.mul_(CBE.view(m, R * L, L)).view(m, R, L, L)                      # dW * W / dt_s
                cols = prod.sum(-2)                                                         # (m, R, L): sum over l
                d_dt[rows] += cols
                dA_b.view(m * R, L, 1).baddbmm_(prod.view(m * R, L, L), dt_b.reshape(m * R, L, 1))  # row sums of dW * W
                dA_b.sub_(cols * dt_b)                                                      # column sums of dW * W
                dC_b.view(m, R * L, N).baddbmm_(dCB, B_b)
                dC[:, k0:k1] = dC_b.view(nk, b, G, R, L, N).permute(1, 0, 4, 2, 3, 5)
                dBg[rows].baddbmm_(dCB.transpose(1, 2), C_b.view(m, R * L, N))
            dA_cum[..., -1] += dA_last.view(M, R)                                           # a_k, w_state: exp(+A_last)

        dS0 = dS_all[0].view(b, G * R, P, N) if ctx.has_S0 else None
        return dxT, dBg, dC, d_dt, dA_cum, dS0, None, None, None, None


def _decay_products(Cg: Tensor, Bg: Tensor, A_cum: Tensor, dtg: Tensor, same_doc: Tensor | None, b: int, G: int,
                    factored: bool, for_backward: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """W = (C_l . B_s) * exp(A_cum_l - A_cum_s) * dt_s for s <= l in one document, for a block of rows.

    Also returns E * dt (the gradient of C.B) and C.B * E (of dt) when ``for_backward``.
    Cg (m, R, L, N), Bg (m, L, N), A_cum and dtg (m, R, L), same_doc None or (chunks, b, 1, 1, L, L).
    factored: every chunk's decay span is below _FACTORED_SPAN (see there).
    """
    m, R, L, N = Cg.shape
    CB = torch.bmm(Cg.view(m, R * L, N), Bg.transpose(1, 2)).view(m, R, L, L)
    if factored:  # exp(A_l - A_s) = exp(A_l - mid) * exp(mid - A_s): 2L exps instead of L*L
        mid = (A_cum[..., :1] + A_cum[..., -1:]) / 2
        E = torch.exp(A_cum - mid)[..., :, None] * torch.exp(mid - A_cum)[..., None, :]  # (m, R, l, s)
    else:
        E = (A_cum[..., :, None] - A_cum[..., None, :]).exp_()
    E.tril_()                                     # s > l may have overflowed to inf: overwritten, never multiplied
    if same_doc is not None:                      # finite now: a 0/1 product is safe, and 10x faster than masked_fill_
        E.view(-1, b, G, R, L, L).mul_(same_doc)
    dt_s = dtg[..., None, :]
    if not for_backward:
        return CB.mul_(E).mul_(dt_s), None, None
    CBE = CB.mul_(E)
    Edt = E.mul_(dt_s)
    return CBE * dt_s, Edt, CBE


def _rows_of(t: Tensor, k0: int, k1: int) -> Tensor:
    """Chunks k0..k1 of a (B, c, L, G, R, X) tensor copied into row order: (rows, R, L, X)."""
    b, _, L, G, R, X = t.shape
    out = t.new_empty((k1 - k0) * b * G, R, L, X)                      # always a copy: callers write into it
    out.view(k1 - k0, b, G, R, L, X).copy_(t[:, k0:k1].permute(1, 0, 3, 4, 2, 5))
    return out


def _blocks(like: Tensor, c: int, rows_per_chunk: int, row_numel: int):
    """(first chunk, end chunk, row slice) for blocks of whole chunks of about _BLOCK_BYTES of (R, L, L) product.

    On CPU that keeps a block's intermediates in cache. A GPU gains nothing from it and pays a kernel
    launch per op per block, so there the whole sequence is one block.
    """
    if like.device.type == "cpu":
        per_block = max(1, _BLOCK_BYTES // (row_numel * like.element_size() * rows_per_chunk))
    else:
        per_block = c
    for k0 in range(0, c, per_block):
        k1 = min(c, k0 + per_block)
        yield k0, k1, slice(k0 * rows_per_chunk, k1 * rows_per_chunk)


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrent step, updating ``state`` in place.

    state (B, H, P, N) (fp32 or wider; the math runs in its dtype), x (B, G, P), dt (B, H), A (H,),
    B (B, G, N), C (B, H, N). Returns y (B, H, P) in the state's dtype, and the state.
    """
    b, H, P, N = state.shape
    G = x.shape[1]
    R = H // G
    f = state.dtype
    x, dt, B, C = x.to(f), dt.to(f), B.to(f), C.to(f)
    S = state.view(b, G, R, P, N)
    a = torch.exp(dt * A.to(f)).view(b, G, R, 1, 1)                          # (b, G, R, 1, 1)
    dx = dt.view(b, G, R, 1) * x[:, :, None, :]                                # (b, G, R, P)
    S.mul_(a).add_(dx[..., None] * B[:, :, None, None, :])                     # (b, G, R, P, N)
    y = torch.matmul(state, C[..., None]).view(b, H, P)                        # (b, H, P, N) @ (b, H, N, 1)
    return y, state


def ssd_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  seg: Tensor | None = None, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence as a plain loop over time: the ground truth for ``ssd_chunked``.

    Same arguments and results as ``ssd_chunked`` (y in x's dtype, the final state in fp32 or wider). Iterates over ``unbind`` views and stacks the
    outputs, so its backward stays linear in T (writing into a preallocated ``y[:, t]`` does not).
    """
    b, T, G, P = x.shape
    H, N = dt.shape[-1], B.shape[-1]
    R = H // G
    dtype = x.dtype
    f = torch.promote_types(dtype, torch.float32)
    xh = x.to(f).repeat_interleave(R, dim=2)             # (b, T, H, P): head h reads group h // R
    Bh = B.to(f).repeat_interleave(R, dim=2)             # (b, T, H, N)
    dt, C, A = dt.to(f), C.to(f), A.to(f)
    S = initial_state.to(f) if initial_state is not None else xh.new_zeros(b, H, P, N)
    ys = []
    prev_seg = seg[:, 0] if seg is not None else None
    for t, (x_t, dt_t, B_t, C_t) in enumerate(zip(xh.unbind(1), dt.unbind(1), Bh.unbind(1), C.unbind(1))):
        a = torch.exp(dt_t * A)                          # (b, H)
        if seg is not None:
            a = a * (seg[:, t] == prev_seg).float()[:, None]
            prev_seg = seg[:, t]
        S = a[:, :, None, None] * S + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C_t))
    return torch.stack(ys, dim=1).to(dtype), S


def causal_conv(u: Tensor, weight: Tensor, bias: Tensor | None, seg: Tensor | None = None,
                state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv along T, kept in (B, T, C) layout (no transposes).

    u (B, T, C), weight (C, K) with the last tap multiplying the current step, bias (C,),
    state (B, K-1, C): the K-1 inputs before u (zeros when None). Taps that would reach into a
    previous document read zero. Returns the output (B, T, C) and the new state (B, K-1, C).
    """
    b, T, C = u.shape
    K = weight.shape[1]
    past = state if state is not None else u.new_zeros(b, K - 1, C)
    full = torch.cat([past.to(u.dtype), u], dim=1)       # (B, K-1+T, C)
    out = u * weight[:, K - 1]
    for j in range(1, K):                                # tap looking j steps back
        shifted = full[:, K - 1 - j: K - 1 - j + T]
        if seg is not None:  # steps before u belong to the segment of u's first step
            same = torch.ones_like(seg, dtype=torch.bool)
            same[:, j:] = seg[:, j:] == seg[:, :-j]
            same[:, :j] = seg[:, :j] == seg[:, :1]
            shifted = shifted * same[..., None]
        out = out + shifted * weight[:, K - 1 - j]
    if bias is not None:
        out = out + bias
    return out, full[:, -(K - 1):] if K > 1 else full[:, :0]
