"""SSM throughput: chunked SSD vs the sequential reference vs mambapy's parallel-scan Mamba.

Two levels, tokens/s for forward and forward+backward at T in {1024, 4096} (batch 1, fp32):

- ``scan``: the selective scan alone (what the three implementations differ in). Ours: 16 heads x 64,
  N = 64, 4 groups (d_inner 1024), chunk 64; mambapy: ``MambaBlock.selective_scan`` (pscan) at the
  Mamba-1 shape d_inner 1024, N = 16. ``speedup_vs_*`` at the longest T are computed on this level.
- ``mixer``: the whole mixer module, projections included, d_model = d_inner = 1024 for both (mambapy
  with expand 1). At these widths the in/out projections dominate, so ratios are much smaller.

    python benchmarks/scan.py --json bench-results/scan.json [--quick] [--threads N] [--clock cpu]
"""

from __future__ import annotations

import torch
from common import emit, median_seconds, parser, setup

from aetheris.config import AetherisConfig
from aetheris.model import SSMMixer
from aetheris.ssd import ssd_chunked, ssd_reference


def ours(d_model: int, impl: str) -> SSMMixer:
    cfg = AetherisConfig(vocab_size=8, d_model=d_model, n_layer=2, n_heads=16, head_dim=d_model // 16,
                         d_state=64, n_groups=4, d_ff=8, chunk_size=64, scan_impl=impl)
    from aetheris.model import Aetheris
    return next(m for m in Aetheris(cfg).modules() if isinstance(m, SSMMixer))


def mambapy_block(d_model: int):
    from mambapy.mamba import MambaBlock, MambaConfig
    return MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=16, expand_factor=1, pscan=True))


def backward_with_fixed_gradient(out, upstream: dict) -> None:
    """Backpropagate a fixed random output gradient (made once, on the untimed warm-up call), so the
    timing is the op's own backward and not a loss function's (a square().mean() loss added several
    elementwise passes over the (T, H, P) output to every implementation)."""
    out = out[0] if isinstance(out, tuple) else out
    if "grad" not in upstream:
        upstream["grad"] = torch.randn_like(out)
    out.backward(upstream["grad"])


def measure(module, x: torch.Tensor, repeats: int) -> dict:
    upstream = {}

    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        backward_with_fixed_gradient(module(x), upstream)

    T = x.shape[1]
    return {"fwd_tok_s": T / median_seconds(fwd, repeats), "fwd_bwd_tok_s": T / median_seconds(fwd_bwd, repeats)}


def scan_inputs(T: int, d_inner: int):
    H, G, N = 16, 4, 64
    P = d_inner // H
    ours = [torch.randn(1, T, G, P), torch.rand(1, T, H) * 0.1, -torch.rand(H) - 0.5,
            torch.randn(1, T, G, N), torch.randn(1, T, H, N)]
    peer = [torch.randn(1, T, d_inner), torch.rand(1, T, d_inner) * 0.1, -torch.rand(d_inner, 16) - 0.5,
            torch.randn(1, T, 16), torch.randn(1, T, 16), torch.randn(d_inner)]
    return ours, peer


def measure_fn(fn, inputs: list, T: int, repeats: int) -> dict:
    upstream = {}

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        leaves = [t.detach().requires_grad_() for t in inputs]
        backward_with_fixed_gradient(fn(*leaves), upstream)

    return {"fwd_tok_s": T / median_seconds(fwd, repeats), "fwd_bwd_tok_s": T / median_seconds(fwd_bwd, repeats)}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    d_model = 256 if args.quick else 1024
    lengths = [256, 1024] if args.quick else [1024, 4096]
    peer_block = mambapy_block(d_model)
    impls = ("chunked", "reference", "mambapy")
    results = {"d_model": d_model, "lengths": lengths, "scan": {k: {} for k in impls},
               "mixer": {k: {} for k in impls}}
    for T in lengths:
        ours_in, peer_in = scan_inputs(T, d_model)
        results["scan"]["chunked"][T] = measure_fn(lambda *a: ssd_chunked(*a, 64), ours_in, T, repeats=5)
        results["scan"]["reference"][T] = measure_fn(ssd_reference, ours_in, T, repeats=1)
        results["scan"]["mambapy"][T] = measure_fn(peer_block.selective_scan, peer_in, T, repeats=3)
        x = torch.randn(1, T, d_model)
        results["mixer"]["chunked"][T] = measure(ours(d_model, "chunked"), x, repeats=5)
        results["mixer"]["reference"][T] = measure(ours(d_model, "reference"), x, repeats=1)
        results["mixer"]["mambapy"][T] = measure(peer_block, x, repeats=3)
    T = lengths[-1]
    for level, prefix in (("scan", ""), ("mixer", "mixer_")):
        for peer in ("reference", "mambapy"):
            results[f"{prefix}speedup_vs_{peer}"] = {
                mode: results[level]["chunked"][T][mode] / results[level][peer][T][mode]
                for mode in ("fwd_tok_s", "fwd_bwd_tok_s")}
    results["speedup_at_T"] = T
    emit(args, results)


if __name__ == "__main__":
    main()
