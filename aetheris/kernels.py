"""Optional fused kernels, import-guarded. CPU never needs them; each is tested against ``ssd_reference``.

``mamba-ssm`` (pip extra ``aetheris[kernels]``) ships Triton kernels for the chunked SSD scan on CUDA.
Its ``mamba_chunk_scan_combined`` takes x and B per group exactly like our layout, with dt already
softplus'ed here (``dt_softplus=False``) and the D skip applied by the mixer (``D=None``).
"""

from __future__ import annotations

import torch
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
