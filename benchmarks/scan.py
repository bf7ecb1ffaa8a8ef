"""SSM mixer throughput: chunked SSD vs the sequential reference vs mambapy's parallel-scan Mamba.

Tokens/s for forward and forward+backward of one mixer at T in {1024, 4096} (batch 1, fp32), with
d_model = d_inner = 1024 for both models (ours: 16 heads x 64, N = 64, 4 groups; mambapy: Mamba-1
with expand 1, N = 16). The reference loop is timed once per setting (it is slow by design).

    python benchmarks/scan.py --json bench-results/scan.json [--quick]
"""

from __future__ import annotations

import torch
from common import emit, median_seconds, parser, setup

from aetheris.config import AetherisConfig
from aetheris.model import SSMMixer


def ours(d_model: int, impl: str) -> SSMMixer:
    cfg = AetherisConfig(vocab_size=8, d_model=d_model, n_layer=2, n_heads=16, head_dim=d_model // 16,
                         d_state=64, n_groups=4, d_ff=8, chunk_size=64, scan_impl=impl)
    from aetheris.model import Aetheris
    return next(m for m in Aetheris(cfg).modules() if isinstance(m, SSMMixer))


def mambapy_block(d_model: int):
    from mambapy.mamba import MambaBlock, MambaConfig
    return MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=16, expand_factor=1, pscan=True))


def measure(module, x: torch.Tensor, repeats: int) -> dict:
    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()

    T = x.shape[1]
    return {"fwd_tok_s": T / median_seconds(fwd, repeats), "fwd_bwd_tok_s": T / median_seconds(fwd_bwd, repeats)}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    d_model = 256 if args.quick else 1024
    lengths = [256, 1024] if args.quick else [1024, 4096]
    results = {"d_model": d_model, "lengths": lengths, "chunked": {}, "reference": {}, "mambapy": {}}
    for T in lengths:
        x = torch.randn(1, T, d_model)
        results["chunked"][T] = measure(ours(d_model, "chunked"), x, repeats=5)
        results["reference"][T] = measure(ours(d_model, "reference"), x, repeats=1)
        results["mambapy"][T] = measure(mambapy_block(d_model), x, repeats=3)
    T = lengths[-1]
    for peer in ("reference", "mambapy"):
        results[f"speedup_vs_{peer}"] = {
            mode: results["chunked"][T][mode] / results[peer][T][mode] for mode in ("fwd_tok_s", "fwd_bwd_tok_s")}
    results["speedup_at_T"] = T
    emit(args, results)


if __name__ == "__main__":
    main()
