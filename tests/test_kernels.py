"""Scan implementations behind ``scan_impl`` agree; the optional CUDA kernel is held to the reference."""

import pytest
import torch

from conftest import tiny_config
from aetheris import kernels
from aetheris.model import Aetheris
from aetheris.ssd import ssd_reference

SMALL = dict(vocab_size=50, n_layer=2, d_ff=32)  # the shared tiny shape, smaller still


def test_reference_scan_model_equals_chunked_model():
    x = torch.randint(0, 50, (2, 21))
    outs = []
    for impl in ("chunked", "reference"):
        torch.manual_seed(0)
        outs.append(Aetheris(tiny_config(**SMALL, scan_impl=impl)).double()(x).logits)
    torch.testing.assert_close(outs[0], outs[1])


def test_fused_kernel_on_cpu_is_a_clear_error():
    torch.manual_seed(0)
    model = Aetheris(tiny_config(**SMALL, scan_impl="mamba_ssm"))
    with pytest.raises(RuntimeError, match="chunked"):
        model(torch.randint(0, 50, (1, 5)))


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.mamba_chunk_scan_combined is not None),
                    reason="needs CUDA and the optional mamba-ssm kernels (pip install 'aetheris[kernels]')")
def test_mamba_ssm_kernel_matches_reference():
    g = torch.Generator().manual_seed(0)
    b, T, G, R, P, N = 2, 200, 2, 4, 64, 64
    H = G * R
    x = torch.randn(b, T, G, P, generator=g)
    dt = torch.rand(b, T, H, generator=g) * 0.1
    A = -torch.rand(H, generator=g)
    B = torch.randn(b, T, G, N, generator=g)
    C = torch.randn(b, T, H, N, generator=g)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C)
    y, s = kernels.ssd_mamba_ssm(*(t.cuda() for t in (x, dt, A, B, C)), 64)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=2e-3, atol=2e-3)
