"""MoE layer cost vs the GEMM-only lower bound.

Forward+backward of ``aetheris.model.MoE`` (route, sort by expert, per-expert SwiGLU, weighted
scatter-back, aux loss) against the same expert matmuls run on tokens that are already grouped
(no routing, no sort, no scatter): ``overhead_vs_gemm`` = MoE time / GEMM-only time. Default shape
(the nano student's FFN): 4 experts, top-1, 512 -> 1408, 4096 tokens, fp32.

    python benchmarks/moe.py --json bench-results/moe.json [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import emit, median_seconds, parser, setup

from aetheris.config import AetherisConfig
from aetheris.model import MoE


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    D, Fh, M = (256, 704, 1024) if args.quick else (512, 1408, 4096)
    cfg = AetherisConfig(vocab_size=8, d_model=D, n_layer=2, n_heads=4, head_dim=D // 4, d_state=16, n_groups=1,
                         d_ff=Fh, n_experts=4, top_k=1)
    moe = MoE(cfg)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(w, std=0.02)
    torch.nn.init.normal_(moe.router.weight, std=0.02)
    x = torch.randn(1, M, D, requires_grad=True)

    def moe_fwd_bwd():
        y, aux = moe(x)
        (y.square().mean() + aux).backward()

    with torch.no_grad():
        _, _, top_i = moe.route(x[0])
    counts = torch.bincount(top_i.flatten(), minlength=cfg.n_experts).tolist()
    grouped = x.detach()[0][top_i.flatten().argsort(stable=True)].clone().requires_grad_()

    def gemm_fwd_bwd():  # the expert matmuls alone, on tokens already grouped by expert
        outs = []
        for e, x_e in enumerate(grouped.split(counts)):
            h = F.silu(F.linear(x_e, moe.w_gate[e])) * F.linear(x_e, moe.w_up[e])
            outs.append(F.linear(h, moe.w_down[e]))
        torch.cat(outs).square().mean().backward()

    def moe_fwd():
        with torch.no_grad():
            moe(x)

    def gemm_fwd():
        with torch.no_grad():
            for e, x_e in enumerate(grouped.split(counts)):
                F.linear(F.silu(F.linear(x_e, moe.w_gate[e])) * F.linear(x_e, moe.w_up[e]), moe.w_down[e])

    repeats = 5 if args.quick else 9
    # Interleave the two measurements so machine noise hits both alike.
    t = {name: median_seconds(fn, repeats) for name, fn in
         (("moe_fwd_bwd", moe_fwd_bwd), ("gemm_fwd_bwd", gemm_fwd_bwd), ("moe_fwd", moe_fwd), ("gemm_fwd", gemm_fwd))}
    emit(args, {"shape": {"tokens": M, "d_model": D, "d_ff": Fh, "experts": 4, "top_k": 1},
                "expert_counts": counts, "seconds": t,
                "overhead_vs_gemm": t["moe_fwd_bwd"] / t["gemm_fwd_bwd"],
                "overhead_vs_gemm_fwd": t["moe_fwd"] / t["gemm_fwd"]})


if __name__ == "__main__":
    main()
