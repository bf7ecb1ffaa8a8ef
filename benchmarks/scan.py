"""SSM throughput: chunked SSD vs the sequential reference vs mambapy's parallel-scan Mamba.

Two levels, tokens/s for forward and forward+backward at T in {1024, 4096} (batch 1, fp32):

- ``scan``: the selective scan alone (what the three implementations differ in). Ours: 16 heads x 64,
  N = 64, 4 groups (d_inner 1024), chunk 64; mambapy: ``MambaBlock.selective_scan`` (pscan) at the
  Mamba-1 shape d_inner 1024, N = 16. ``speedup_vs_*`` at the longest T are computed on this level.
- ``mixer``: the whole mixer module, projections included, d_model = d_inner = 1024 for both (mambapy
  with expand 1). At these widths the in/out projections dominate, so ratios are much smaller.

The implementations are timed in turns, round after round (7; 3 with --quick), and each speedup is the
median over rounds of the peer's time / ours in that round, so the machine's drift lands on both sides.

    python benchmarks/scan.py --json bench-results/scan.json [--quick] [--threads N] [--clock cpu]
"""

from __future__ import annotations

import statistics

import torch
from common import emit, interleaved_seconds, median_ratio, parser, setup

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


def timed_calls(call, inputs: list) -> dict:
    """The forward (no grad) and forward+backward of one implementation, as zero-argument functions."""
    upstream = {}

    def fwd():
        with torch.no_grad():
            call(*inputs)

    def fwd_bwd():
        leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
        backward_with_fixed_gradient(call(*leaves), upstream)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def scan_inputs(T: int, d_inner: int):
    H, G, N = 16, 4, 64
    P = d_inner // H
    ours = [torch.randn(1, T, G, P), torch.rand(1, T, H) * 0.1, -torch.rand(H) - 0.5,
            torch.randn(1, T, G, N), torch.randn(1, T, H, N)]
    peer = [torch.randn(1, T, d_inner), torch.rand(1, T, d_inner) * 0.1, -torch.rand(d_inner, 16) - 0.5,
            torch.randn(1, T, 16), torch.randn(1, T, 16), torch.randn(d_inner)]
    return ours, peer


def measure(calls: dict, T: int, rounds: int) -> tuple[dict, dict]:
    """Interleaved rounds over {impl: (call, inputs)}: tokens/s (medians) and the per-round times."""
    fns = {(impl, mode): fn for impl, (call, inputs) in calls.items()
           for mode, fn in timed_calls(call, inputs).items()}
    times = interleaved_seconds(fns, rounds)
    tok_s = {impl: {f"{mode}_tok_s": T / statistics.median(times[impl, mode]) for mode in ("fwd", "fwd_bwd")}
             for impl in calls}
    return tok_s, times


def speedups(times: dict, ours: str, peer: str) -> dict:
    """Peer time / our time, median over rounds."""
    return {f"{mode}_tok_s": median_ratio(times[peer, mode], times[ours, mode]) for mode in ("fwd", "fwd_bwd")}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    d_model = 256 if args.quick else 1024
    lengths = [256, 1024] if args.quick else [1024, 4096]
    peer_block = mambapy_block(d_model)
    impls = ("chunked", "reference", "mambapy")
    results = {"d_model": d_model, "lengths": lengths, "scan": {k: {} for k in impls},
               "mixer": {k: {} for k in impls}}
    rounds = 3 if args.quick else 7
    for T in lengths:
        ours_in, peer_in = scan_inputs(T, d_model)
        x = torch.randn(1, T, d_model)
        levels = {
            "scan": {"chunked": (lambda *a: ssd_chunked(*a, 64), ours_in), "reference": (ssd_reference, ours_in),
                     "mambapy": (peer_block.selective_scan, peer_in)},
            "mixer": {"chunked": (ours(d_model, "chunked"), [x]), "reference": (ours(d_model, "reference"), [x]),
                      "mambapy": (peer_block, [x])},
        }
        for level, calls in levels.items():
            tok_s, times = measure(calls, T, rounds)
            for impl in impls:
                results[level][impl][T] = tok_s[impl]
            if T == lengths[-1]:
                prefix = "" if level == "scan" else "mixer_"
                for peer in ("reference", "mambapy"):
                    results[f"{prefix}speedup_vs_{peer}"] = speedups(times, "chunked", peer)
    results["speedup_at_T"] = T
    emit(args, results)


if __name__ == "__main__":
    main()
