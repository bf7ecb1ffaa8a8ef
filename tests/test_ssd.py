"""The chunked SSD scan, the causal conv and the recurrent step against the plain sequential loop."""

import pytest
import torch

from aetheris import ssd
from aetheris.ssd import causal_conv, segment_index, ssd_chunked, ssd_reference, ssd_step


def make_inputs(b=2, T=50, G=2, R=2, P=4, N=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    H = G * R
    x = torch.randn(b, T, G, P, generator=g, dtype=dtype)
    dt = torch.rand(b, T, H, generator=g, dtype=dtype) * 0.5 + 0.01
    A = -(torch.rand(H, generator=g, dtype=dtype) * 2 + 0.1)
    B = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, H, N, generator=g, dtype=dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("T", [1, 33, 64])
def test_chunked_equals_reference_forward(chunk, T):
    x, dt, A, B, C = make_inputs(T=T)
    y, S = ssd_chunked(x, dt, A, B, C, chunk)
    y_ref, S_ref = ssd_reference(x, dt, A, B, C)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [8, 16])
def test_chunked_equals_reference_gradients(chunk):
    inputs = [t.requires_grad_() for t in make_inputs(T=37)]
    y, S = ssd_chunked(*inputs, chunk)
    grads = torch.autograd.grad((y.sin().sum() + S.cos().sum()), inputs)
    inputs_ref = [t.detach().clone().requires_grad_() for t in inputs]
    y_ref, S_ref = ssd_reference(*inputs_ref)
    grads_ref = torch.autograd.grad((y_ref.sin().sum() + S_ref.cos().sum()), inputs_ref)
    for name, g, g_ref in zip("x dt A B C".split(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def _packed_case(b=2, T=45, G=2, R=2, docs=None, seed=0):
    """Inputs with an initial state and packed documents; docs: per row, the document lengths."""
    x, dt, A, B, C = make_inputs(b=b, T=T, G=G, R=R, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    S0 = torch.randn(b, G * R, x.shape[-1], B.shape[-1], generator=g, dtype=x.dtype)
    if docs is None:  # starts mid-chunk: 10 and 30 at T = 45
        first, second = T * 2 // 9, T * 2 // 3
        docs = [[first, second - first, T - second], [3, T - 3]][:b]
    doc_ids = torch.tensor([sum(([i] * n for i, n in enumerate(lengths)), []) for lengths in docs])
    return [x, dt, A, B, C, S0], segment_index(doc_ids)


GRADIENT_CASES = {  # chunk, G, R, documents per row (T = 45)
    "mid-chunk starts": (4, 2, 2, None),
    "starts on chunk starts, a 1-token document": (8, 2, 2, [[8, 16, 1, 20], [24, 21]]),
    "three starts in one chunk, one group": (16, 1, 4, [[5, 3, 4, 33], [45]]),
    "chunk 1, one head per group": (1, 3, 1, [[10, 35], [1, 44]]),
    "chunk longer than T": (64, 2, 3, [[20, 25], [45]]),
}


@pytest.mark.parametrize("block_bytes", [1, None])  # 1: every chunk is its own block (the multi-block path)
@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_chunked_gradients_with_documents_and_initial_state(case, block_bytes, monkeypatch):
    # The hand-written backward against autograd through the sequential loop: packed documents, an initial
    # state, two rows, T not a multiple of the chunk, and chunks processed one block at a time.
    if block_bytes is not None:
        monkeypatch.setattr(ssd, "_BLOCK_BYTES", block_bytes)
    chunk, G, R, docs = GRADIENT_CASES[case]
    inputs, seg = _packed_case(G=G, R=R, docs=docs)
    inputs = [t.requires_grad_() for t in inputs]
    x, dt, A, B, C, S0 = inputs
    y, S = ssd_chunked(x, dt, A, B, C, chunk, seg=seg, initial_state=S0)
    grads = torch.autograd.grad(y.sin().sum() + S.cos().sum(), inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    x, dt, A, B, C, S0 = ref_inputs
    y_ref, S_ref = ssd_reference(x, dt, A, B, C, seg=seg, initial_state=S0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    grads_ref = torch.autograd.grad(y_ref.sin().sum() + S_ref.cos().sum(), ref_inputs)
    for name, g, g_ref in zip("x dt A B C initial_state".split(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_chunked_gradients_of_y_alone_and_of_some_inputs():
    # No gradient reaches the final state (autograd passes zeros), and only x and C ask for one.
    x, dt, A, B, C = make_inputs(T=37)
    x.requires_grad_(), C.requires_grad_()
    gx, gC = torch.autograd.grad(ssd_chunked(x, dt, A, B, C, 8)[0].sin().sum(), [x, C])
    x_ref, C_ref = x.detach().clone().requires_grad_(), C.detach().clone().requires_grad_()
    gx_ref, gC_ref = torch.autograd.grad(ssd_reference(x_ref, dt, A, B, C_ref)[0].sin().sum(), [x_ref, C_ref])
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gC, gC_ref, rtol=1e-9, atol=1e-9)


def test_chunked_scan_runs_in_fp32_under_autocast():
    # Under bf16 autocast the bmm outputs would be bf16 and meet fp32 operands in baddbmm_; the scan keeps
    # its math in fp32 instead, so its result and gradients equal those without autocast.
    inputs = [t.float().requires_grad_() for t in make_inputs(T=37)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, S = ssd_chunked(*inputs, 8)
        grads = torch.autograd.grad(y.sum() + S.sum(), inputs)
    plain = [t.detach().clone().requires_grad_() for t in inputs]
    y_plain, S_plain = ssd_chunked(*plain, 8)
    torch.testing.assert_close(y, y_plain)
    for g, g_plain in zip(grads, torch.autograd.grad(y_plain.sum() + S_plain.sum(), plain)):
        torch.testing.assert_close(g, g_plain)


def test_chunked_backward_passes_gradcheck(monkeypatch):
    # Finite differences on every input, through two blocks, a document start and an initial state.
    monkeypatch.setattr(ssd, "_BLOCK_BYTES", 1)
    inputs, seg = _packed_case(b=2, T=11)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: ssd_chunked(*a[:5], 4, seg=seg, initial_state=a[5]), inputs)


@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: chunk spans far above _FACTORED_SPAN, direct exp
def test_chunked_equals_reference_either_way_of_computing_decays(scale):
    x, dt, A, B, C = make_inputs(T=37)
    A = A * scale
    inputs = [x, dt, A, B, C]
    span = (dt[:, :16] * -A).sum(1).max()                          # one chunk's log-decay, upper bound
    assert (span < ssd._FACTORED_SPAN) == (scale == 1.0)
    inputs = [t.requires_grad_() for t in inputs]
    y, S = ssd_chunked(*inputs, 16)
    grads = torch.autograd.grad(y.sin().sum() + S.cos().sum(), inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y_ref, S_ref = ssd_reference(*ref_inputs)
    grads_ref = torch.autograd.grad(y_ref.sin().sum() + S_ref.cos().sum(), ref_inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, g, g_ref in zip("x dt A B C".split(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_factored_decays_keep_fp32_precision_near_the_span_limit(monkeypatch):
    # Chunks whose log-decay spans ~140 (factors up to exp(70)): fp32 with factored exps is as close to the
    # fp64 loop as fp32 with direct exps.
    x, dt, A, B, C = make_inputs(b=1, T=128, G=1, R=2)
    dt = torch.full_like(dt, 1.1)
    A = torch.tensor([-2.0, -0.5], dtype=torch.float64)            # spans 64 * 1.1 * 2 = 141 and 35
    y_ref, _ = ssd_reference(x, dt, A, B, C)
    f32 = [t.float() for t in (x, dt, A, B, C)]
    y_factored, _ = ssd_chunked(*f32, 64)
    monkeypatch.setattr(ssd, "_FACTORED_SPAN", 0.0)
    y_direct, _ = ssd_chunked(*f32, 64)
    err_factored = (y_factored.double() - y_ref).abs().max()
    err_direct = (y_direct.double() - y_ref).abs().max()
    assert err_factored < 1e-4 * y_ref.abs().max()
    assert err_factored < 4 * err_direct + 1e-6


def test_fp32_chunked_close_to_reference():
    x, dt, A, B, C = make_inputs(T=130, dtype=torch.float32)
    y, _ = ssd_chunked(x, dt, A, B, C, 64)
    y_ref, _ = ssd_reference(x, dt, A, B, C)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_initial_state_continues_the_scan():
    x, dt, A, B, C = make_inputs(T=40)
    y_full, S_full = ssd_chunked(x, dt, A, B, C, 8)
    y1, S1 = ssd_chunked(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], 8)
    y2, S2 = ssd_chunked(x[:, 23:], dt[:, 23:], A, B[:, 23:], C[:, 23:], 8, initial_state=S1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    torch.testing.assert_close(S2, S_full)


def test_step_equals_reference():
    x, dt, A, B, C = make_inputs(T=20)
    state = torch.zeros(2, 4, 4, 3, dtype=torch.float64)
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])[0] for t in range(20)]
    y_ref, S_ref = ssd_reference(x, dt, A, B, C)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref)
    torch.testing.assert_close(state, S_ref)


@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_document_boundaries_reset_the_state(chunk):
    x, dt, A, B, C = make_inputs(b=1, T=45)
    doc_ids = torch.tensor([[3] * 10 + [7] * 20 + [1] * 15])
    seg = segment_index(doc_ids)
    y, _ = ssd_chunked(x, dt, A, B, C, chunk, seg=seg)
    y_ref, _ = ssd_reference(x, dt, A, B, C, seg=seg)
    torch.testing.assert_close(y, y_ref)
    for start, end in [(0, 10), (10, 30), (30, 45)]:  # each document alone
        y_doc, _ = ssd_chunked(x[:, start:end], dt[:, start:end], A, B[:, start:end], C[:, start:end], chunk)
        torch.testing.assert_close(y[:, start:end], y_doc)


def test_groups_are_expanded_per_head_not_per_row():
    # Head h must read group h // R (GQA's repeat_kv layout). Make group 1's input zero: then heads
    # 0..R-1 are non-zero and heads R..H-1 are exactly zero. Per-row expansion would mix them.
    x, dt, A, B, C = make_inputs(T=12, G=2, R=3)
    x[:, :, 1] = 0
    y, _ = ssd_chunked(x, dt, A, B, C, 4)
    assert (y[:, :, :3].abs().sum(dim=(0, 1, 3)) > 0).all()
    assert y[:, :, 3:].abs().max() == 0


def test_causal_conv_matches_conv1d_and_resets_at_boundaries():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 19, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    out, state = causal_conv(u, w, bias)
    ref = torch.nn.functional.conv1d(u.transpose(1, 2), w[:, None], bias, padding=3, groups=5)[..., :19].transpose(1, 2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(state, u[:, -3:])
    seg = segment_index(torch.tensor([[0] * 8 + [1] * 11] * 2))
    out_seg, _ = causal_conv(u, w, bias, seg=seg)
    torch.testing.assert_close(out_seg[:, :8], causal_conv(u[:, :8], w, bias)[0])
    torch.testing.assert_close(out_seg[:, 8:], causal_conv(u[:, 8:], w, bias)[0])
