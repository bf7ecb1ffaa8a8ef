"""Optional fused kernels, import-guarded. CPU never needs them; each is tested against its reference.

``mamba-ssm`` (pip extra ``aetheris[kernels]``) ships Triton kernels for the chunked SSD scan on CUDA.
Its ``mamba_chunk_scan_combined`` takes x and B per group exactly like our layout, with dt already
softplus'ed here (``dt_softplus=False``) and the D skip applied by the mixer (``D=None``); tested against
``ssd_reference``.

oneDNN's prepacked linear weights (in every CPU build of torch; what ``torch.compile``'s freezing uses):
``pack_weight`` reorders an (out, in) weight into oneDNN's blocked layout once, and ``packed_linear``
multiplies by it. Batch-1 decode steps are matrix-vector products bound by streaming the weights, and
this layout streams them ~1.5x faster than ``F.linear`` on ``nn.Linear``'s layout on one thread
(docs/BENCHMARKS.md). Inference only; tested against ``F.linear`` (tests/test_decode_layout.py).

The compiled matvec (``decode_linear``): a batch-1 product written as ``(weight * x).sum(-1)`` in fp32 and
compiled by ``torch.compile`` (Inductor's C++ backend) into one fused loop that reads each bf16 weight once,
widens it in registers and accumulates in fp32, split over rows by OpenMP. It reads ``nn.Linear``'s own
layout, so it needs no copy of any weight (the tied 262k head included) and leaves training untouched: more
than one row, autograd, or a device other than the CPU go through ``F.linear``. Compiled once per dtype
(dynamic shapes; a few seconds, done up front by ``aetheris.model.compile_for_decode``); needs the C++
compiler Inductor uses. Tested against ``F.linear`` (tests/test_decode_layout.py).

Long rows stream at half speed through that loop (an expert's down projection at Tiny Aya's width: 11,008
inputs, 6.6 against 14.5 GB/s for 2,048-input rows on one thread): the input row no longer stays in L1 beside
the weights streaming past it. ``block_columns`` reorders such a weight into column blocks (c, N, K/c), each
block's rows short, and ``blocked_linear`` sums the blocks' matvecs in one compiled loop (15-16 GB/s). The
blocks replace the weight, so a model holding them is inference only (``unblock_columns`` gives the weight
back exactly for checkpoints).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # pragma: no cover - only on machines with CUDA and mamba-ssm
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:  # ImportError, or a broken CUDA/Triton install
    mamba_chunk_scan_combined = None


def mamba_ssm_available(device: torch.device) -> bool:
    return mamba_chunk_scan_combined is not None and device.type == "cuda"


def require_mamba_ssm(device: torch.device) -> None:
    if mamba_chunk_scan_combined is None:
        raise RuntimeError("scan_impl='mamba_ssm' needs the optional kernels: pip install 'aetheris[kernels]' "
                           "(CUDA only), or use scan_impl='chunked'")
    if device.type != "cuda":
        raise RuntimeError(f"scan_impl='mamba_ssm' runs on CUDA only, but the model is on {device}; "
                           "use scan_impl='chunked' (or 'auto')")


def ssd_mamba_ssm(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                  seg: Tensor | None = None, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as ``aetheris.ssd.ssd_chunked``; C per head is passed as H groups of one head."""
    require_mamba_ssm(x.device)
    b, T, G, P = x.shape
    H = dt.shape[-1]
    R = H // G
    # The kernel shares B and C per group and x per head: expand x to heads (G -> H), and pass C with
    # ngroups=H by expanding B to heads too.
    xh = x.repeat_interleave(R, dim=2)
    Bh = B.repeat_interleave(R, dim=2)
    y, state = mamba_chunk_scan_combined(
        xh, dt, A, Bh, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
        seq_idx=seg.int() if seg is not None else None, initial_states=initial_state,
        return_final_states=True)
    return y, state


PACKED_INFERENCE_ONLY = ("this model's weights are packed for decoding (aetheris.model.pack_for_decode or "
                         "compile_for_decode), which is inference only: run it under torch.no_grad(), or load the "
                         "checkpoint again without --decode-layout to train or fine-tune it")


def packed_linear_unsupported(weight: Tensor) -> str | None:
    """Why ``weight`` cannot be packed here (one line), or None when it can."""
    if weight.device.type != "cpu":
        return f"the packed decode layout is CPU-only (oneDNN) and the model is on {weight.device}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"the packed decode layout supports float32 and bfloat16 weights, not {str(weight.dtype)[6:]}"
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bfloat16 kernels for this CPU (they need AVX-512 or newer)"
    return None


def pack_weight(weight: Tensor) -> Tensor:
    """An (out, in) weight -> oneDNN's prepacked copy for batch-1 inputs (an opaque mkldnn tensor of the
    same shape and dtype; ``.to_dense()`` gives the (out, in) weight back exactly)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def packed_linear(x: Tensor, packed: Tensor) -> Tensor:
    """``F.linear(x, weight)`` for x (..., in) with the weight packed by ``pack_weight``: (..., out)."""
    if torch.is_grad_enabled():
        # The packed copy is no parameter: gradients would never reach the weights a checkpoint saves.
        raise RuntimeError(PACKED_INFERENCE_ONLY)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x (K,), weight (N, K) -> (N,) in x's dtype: products summed in fp32. The formula ``decode_linear``
    compiles; run eagerly it would materialise an fp32 copy of the weight."""
    return (weight.float() * x.float()).sum(-1).to(x.dtype)


@functools.cache
def _compiled_matvec():
    # dynamic=True: one kernel serves every weight shape of a model (and stays under dynamo's recompile limit).
    return torch.compile(_matvec, dynamic=True, fullgraph=True)


def decode_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` (bias-free) for decode steps: one row on the CPU without autograd runs the
    compiled matvec; anything else (a batch, training, CUDA) runs ``F.linear``."""
    if x.numel() == x.shape[-1] and x.device.type == "cpu" and not torch.is_grad_enabled():
        # Plain tensors, so that one compiled graph serves every shape: dynamo gives parameters static shapes
        # (detach), and guards on the base of a view (clone: a row of K elements).
        return _compiled_matvec()(x.reshape(-1).clone(), weight.detach()).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def compiled_matvec_unsupported(weight: Tensor) -> str | None:
    """Why ``decode_linear`` cannot compile its kernel for ``weight``'s device and dtype (one line), or None
    after compiling it (the first call builds the C++ kernel: seconds, once per process and dtype)."""
    if weight.device.type != "cpu":
        return f"the compiled decode layout is CPU-only (Inductor's C++ backend) and the model is on {weight.device}"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"the compiled decode layout supports float32 and bfloat16 weights, not {str(weight.dtype)[6:]}"
    try:
        with torch.no_grad():
            x = torch.ones(8, dtype=weight.dtype)
            decode_linear(x[None], torch.ones(4, 8, dtype=weight.dtype))
    except Exception as e:  # no C++ compiler, a broken Inductor install, ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"torch.compile could not build the matvec kernel ({type(e).__name__}: {first})"
    return None


def block_columns(weight: Tensor, block: int = 2048) -> Tensor | None:
    """(N, K) -> (c, N, K/c) contiguous column blocks, c the smallest divisor of K giving blocks of at most
    ``block`` columns; None when K has no divisor giving blocks of at least block/8 columns."""
    n, k = weight.shape
    c = next((c for c in range(-(-k // block), k + 1) if k % c == 0), k)
    if k // c < block // 8:
        return None
    return weight.detach().view(n, c, k // c).transpose(0, 1).contiguous()


def in_features(weight: Tensor) -> int:
    """The input width of an (N, K) weight or of its (c, N, K/c) column blocks."""
    return weight.shape[0] * weight.shape[2] if weight.ndim == 3 else weight.shape[1]


def unblock_columns(blocks: Tensor) -> Tensor:
    """``block_columns``' inverse: (c, N, K/c) -> (N, K)."""
    c, n, k = blocks.shape
    return blocks.transpose(0, 1).reshape(n, c * k)


def _blocked_matvec(x: Tensor, blocks: Tensor) -> Tensor:
    """x (K,), blocks (c, N, K/c) -> (N,): per block a matvec on its slice of x, summed in fp32."""
    c, n, k = blocks.shape
    return (blocks.float() * x.float().view(c, 1, k)).sum(-1).sum(0).to(x.dtype)


@functools.cache
def _compiled_blocked_matvec():
    return torch.compile(_blocked_matvec, dynamic=True, fullgraph=True)


def blocked_linear(x: Tensor, blocks: Tensor) -> Tensor:
    """``F.linear(x, unblock_columns(blocks))`` for x (..., K): one row on the CPU runs the compiled blocked
    matvec, more rows one batched product over the blocks. Inference only (the blocks are no parameter)."""
    if torch.is_grad_enabled():
        raise RuntimeError(PACKED_INFERENCE_ONLY)
    c, n, k = blocks.shape
    if x.numel() == x.shape[-1] and x.device.type == "cpu":
        return _compiled_blocked_matvec()(x.reshape(-1).clone(), blocks).view(*x.shape[:-1], n)
    rows = x.reshape(-1, c, k).transpose(0, 1)                                   # (c, M, k)
    partial = torch.bmm(rows, blocks.transpose(1, 2))                           # (c, M, N), one per block
    return partial.sum(0, dtype=torch.float32).to(x.dtype).view(*x.shape[:-1], n)
