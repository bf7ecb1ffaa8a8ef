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
    seg (B, T) or None, initial_state (B, H, P, N) or None.
    Returns y (B, T, H, P) and the final state (B, H, P, N), both in x's dtype.

    Inside, every matmul is one ``bmm`` over a group-major batch (G * B * c) whose matrices stack the
    R heads of a group along their rows ((R*L) x L, (R*P) x L): x and B are read once per group, not
    once per head, and the GEMMs are 4x taller than per-head ones (twice as fast on CPU at L = 64).
    That layout costs exactly one transposing copy of each input (x, B, C) and of y -- einsum over the
    (B, T, ...) layout made several such copies per contraction, forward and backward.
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
    M = G * b * c                                                          # bmm batch: (group, batch, chunk)

    # 1. Group-major copies: row (g, b, c) holds chunk c of group g; heads of a group stack on rows.
    xT = x.reshape(b * c, L, G, P).permute(2, 0, 3, 1).reshape(M, P, L).contiguous()  # (M, P, L), x transposed
    Bg = B.reshape(b * c, L, G, N).permute(2, 0, 1, 3).reshape(M, L, N).contiguous()  # (M, L, N)
    Cg = C.reshape(b * c, L, G, R, N).permute(2, 0, 3, 1, 4).reshape(M, R, L, N).contiguous()
    dtg = dt.reshape(b * c, L, G, R).permute(2, 0, 3, 1).reshape(M, R, L)     # (M, R, L) small
    A_cum = (dtg.reshape(G, b * c, R, L) * A.view(G, 1, R, 1)).cumsum(-1).reshape(M, R, L)  # log-decay from chunk start

    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()   # (l, s): s <= l
    if seg is not None:
        segc = seg.reshape(b * c, L)
        same = segc[:, :, None] == segc[:, None, :]                       # (bc, l, s)
        keep_diag = (causal & same)[:, None].repeat(G, 1, 1, 1)           # (M, 1, l, s)
        # Inputs at s reach the chunk's final state only if s is in the chunk's last segment.
        keep_state = (segc == segc[:, -1:]).repeat(G, 1)[:, None]         # (M, 1, L)
        # Segment of the step just before each chunk (an initial state belongs to segment seg[:, 0]).
        segb = seg.view(b, c, L)
        prev_last = torch.cat([segb[:, :1, :1], segb[:, :-1, -1:]], dim=1)  # (b, c, 1)
        keep_carry_bc = segb == prev_last                                 # (b, c, L) carried state visible at l
        keep_carry = keep_carry_bc.reshape(b * c, L).repeat(G, 1)[:, None]  # (M, 1, L)
        keep_chunk = keep_carry_bc[:, :, -1]                              # (b, c) no document starts in chunk
    else:
        keep_diag = causal
        keep_state = keep_carry = keep_chunk = None

    # 2. Inside each chunk: y_l = sum_{s<=l} (C_l . B_s) * exp(A_cum_l - A_cum_s) * dt_s * x_s.
    # The mask is an additive 0 / -inf bias added in place, and -A_cum is negated while still small:
    # backward then has no masking pass and no full-size negation.
    CB = torch.bmm(Cg.reshape(M, R * L, N), Bg.transpose(1, 2)).view(M, R, L, L)
    mask_bias = torch.zeros(keep_diag.shape, dtype=f, device=x.device).masked_fill_(~keep_diag, float("-inf"))
    log_decay = (A_cum[..., :, None] + (-A_cum)[..., None, :]).add_(mask_bias)  # (M, R, l, s), -inf where masked
    W = CB * (torch.exp(log_decay) * dtg[..., None, :])
    y_diag = torch.bmm(W.view(M, R * L, L), xT.transpose(1, 2))                          # (M, R*L, P)

    # 3. Each chunk's own contribution to the state at its end: (R*P, L) @ (L, N) per group.
    w_state = torch.exp(A_cum[..., -1:] - A_cum) * dtg                    # (M, R, L)
    if keep_state is not None:
        w_state = w_state * keep_state
    xw = xT[:, None] * w_state[:, :, None, :]                             # (M, R, P, L)
    states = torch.bmm(xw.view(M, R * P, L), Bg).view(G, b, c, R, P, N)

    # 4. Across chunks: a short linear recurrence over c chunk states (list + stack keeps backward linear).
    chunk_decay = torch.exp(A_cum[..., -1]).view(G, b, c, R)
    S = (initial_state.to(f).view(b, G, R, P, N).transpose(0, 1) if initial_state is not None
         else x.new_zeros(G, b, R, P, N))
    carried = []                                                          # state entering chunk k
    for k, (state_k, decay_k) in enumerate(zip(states.unbind(2), chunk_decay.unbind(2))):
        carried.append(S)
        if keep_chunk is not None:  # a document starting inside chunk k cuts off what came before it
            decay_k = decay_k * keep_chunk[:, k].to(f).view(1, b, 1)
        S = decay_k[..., None, None] * S + state_k
    carried = torch.stack(carried, dim=2)                                 # (G, b, c, R, P, N)

    # 5. Carried-in state to outputs, added onto y_diag: y_l += exp(A_cum_l) * (C_l . S_in), per head.
    w_off = torch.exp(A_cum)                                              # (M, R, L)
    if keep_carry is not None:
        w_off = w_off * keep_carry
    Cw = Cg * w_off[..., None]                                            # (M, R, L, N)
    y = torch.baddbmm(y_diag.view(M * R, L, P), Cw.reshape(M * R, L, N),
                      carried.view(M * R, P, N).transpose(1, 2))          # (M*R, L, P)
    y = y.view(G, b, c, R, L, P).permute(1, 2, 4, 0, 3, 5).reshape(b, c * L, H, P)[:, :T]  # head = g*R + r
    return y.to(dtype), S.transpose(0, 1).reshape(b, H, P, N).to(dtype)


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

    Same arguments and results as ``ssd_chunked``. Iterates over ``unbind`` views and stacks the
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
    return torch.stack(ys, dim=1).to(dtype), S.to(dtype)


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
