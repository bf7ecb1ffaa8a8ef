"""The decode layouts (``--decode-layout``): packed (``model.pack_for_decode``) and compiled
(``model.compile_for_decode``) == the default for the recurrent step, the prefill and generation; the packed
layout's inference-only errors; the fallbacks; packed models save normal checkpoints, compiled ones stay normal
models."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_config
from aetheris import kernels
from aetheris.checkpoint import load_model, save_model
from aetheris.generation import decode_ids, generate, use_decode_layout
from aetheris.model import Aetheris, MoE, PackedLinear, compile_for_decode, pack_for_decode

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN (torch.backends.mkldnn.is_available())")
needs_bf16 = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                reason="oneDNN has no bfloat16 kernels on this CPU")

# Tied and untied heads, alternating and Cohere2-style parallel (S, M) pairs, top-1 and top-2 routing.
VARIANTS = {"tied": {}, "untied": dict(tie_embeddings=False), "parallel_top2": dict(parallel_pairs=True, top_k=2)}


def tiny(dtype=torch.float32, **overrides) -> Aetheris:
    torch.manual_seed(0)
    return Aetheris(tiny_config(max_seq_len=64, **overrides)).to(dtype).eval()


def packed_copy(model: Aetheris, tied_head: bool = True) -> Aetheris:
    packed = copy.deepcopy(model)
    assert pack_for_decode(packed, tied_head=tied_head) is None
    return packed


def step_logits(model: Aetheris, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill the first half of each row, then one recurrent step per remaining token: (B, steps, V)."""
    half = tokens.shape[1] // 2
    out = model(tokens[:, :half], logits_to_keep=1)
    logits, cache = [out.logits[:, -1]], out.cache
    for t in range(half, tokens.shape[1]):
        logits.append(model.step(tokens[:, t], cache))
    return torch.stack(logits, 1)


@needs_onednn
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_decoding_equals_unpacked_in_float32(variant):
    model = tiny(**VARIANTS[variant])
    packed = packed_copy(model)
    assert packed.decode_layout == "packed-head"
    # Every linear but the routers is packed, and so is every expert.
    routers = [m.router for m in packed.modules() if isinstance(m, MoE)]
    assert [m for m in packed.modules() if type(m) is torch.nn.Linear] == routers
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * model.cfg.layer_kinds.count("S") + (
        model.lm_head is not None)
    assert all(m.packed_experts is not None and not hasattr(m, "w_gate") for m in packed.modules() if isinstance(m, MoE))
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = step_logits(model, tokens), step_logits(packed, tokens)
        # Batch-1 steps take the MoE's direct top-k path, batch 3 the sorted dispatch: test both.
        expected1, got1 = step_logits(model, tokens[:1]), step_logits(packed, tokens[:1])
    # Same products, only oneDNN's summation order differs from MKL's: float32 rounding.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got1, expected1, rtol=1e-5, atol=1e-5)
    prompt = tokens[:1, :5]
    assert decode_ids(packed, prompt, max_new_tokens=12) == decode_ids(model, prompt, max_new_tokens=12)


@pytest.mark.parametrize("layout", ["packed", "compiled"])
@pytest.mark.parametrize("variant", ["tied", "parallel_top2"])
def test_decoding_in_bfloat16_is_as_close_to_float32_as_nn_linear(variant, layout):
    """bf16 products round their outputs, so a layout and the default may differ by a rounding step per layer.
    The tolerance is nn.Linear's own: the layout is no further from the float32 computation with the same
    (bf16-rounded) weights than the default bf16 model is, within a factor 2."""
    if layout == "packed" and not (torch.backends.mkldnn.is_available()
                                   and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("oneDNN has no bfloat16 kernels on this CPU")
    if layout == "compiled" and kernels.compiled_matvec_unsupported(torch.ones(1)) is not None:
        pytest.skip("torch.compile cannot build CPU kernels here (no C++ compiler?)")
    model = tiny(torch.bfloat16, **VARIANTS[variant])
    reference = copy.deepcopy(model).float()
    fast = copy.deepcopy(model)
    assert (pack_for_decode(fast, tied_head=True) if layout == "packed" else compile_for_decode(fast)) is None
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = step_logits(reference, tokens)
        linear_err = (step_logits(model, tokens).float() - exact).abs().max()
        fast_err = (step_logits(fast, tokens).float() - exact).abs().max()
    assert fast_err <= 2 * linear_err + 1e-3 * exact.abs().max()
    prompt = tokens[:, :5]
    assert decode_ids(fast, prompt, max_new_tokens=12) == decode_ids(model, prompt, max_new_tokens=12)


@needs_onednn
def test_packed_generate_equals_unpacked_generate(tiny_tokenizer):
    model = Aetheris(tiny_config(tiny_tokenizer, max_seq_len=64)).eval()
    prompts = ["Hello world, this is a longer prompt", "สวัสดี", "ሰላም ለዓለም"]
    expected = generate(model, tiny_tokenizer, prompts, max_new_tokens=10)
    for tied_head in (False, True):
        got = generate(packed_copy(model, tied_head), tiny_tokenizer, prompts, max_new_tokens=10)
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
        assert [r.text for r in got] == [r.text for r in expected]


@needs_onednn
@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_a_packed_model_saves_a_normal_checkpoint(variant, tmp_path):
    model = tiny(torch.bfloat16, **VARIANTS[variant])
    packed = packed_copy(model)
    expected = model.state_dict()
    state = packed.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) and state[k].layout == torch.strided for k in expected)
    save_model(packed, tmp_path)
    loaded = load_model(tmp_path).eval()
    assert loaded.decode_layout == "linear"
    x = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@needs_onednn
def test_a_packed_model_refuses_training_gradients_moves_and_loading():
    model = tiny()
    packed = packed_copy(model)
    x = torch.randint(0, model.cfg.vocab_size, (1, 6))
    with pytest.raises(RuntimeError, match="inference only"):
        packed.train()
    with pytest.raises(RuntimeError, match="inference only"):
        packed(x, labels=x)  # gradients enabled: the packed copies would never be trained
    with pytest.raises(RuntimeError, match="before packing"):
        packed.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="unpacked model"):
        packed.load_state_dict(model.state_dict())
    assert pack_for_decode(packed) == "the model is already packed (packed-head)"
    body_only = packed_copy(model, tied_head=False)
    assert pack_for_decode(body_only) == "the model is already packed (packed)" and body_only.packed_head is None
    assert pack_for_decode(body_only, tied_head=True) is None and body_only.decode_layout == "packed-head"
    assert torch.equal(body_only.packed_head.to_dense(), model.embed.weight)
    with torch.no_grad():  # and it still decodes after every refusal
        torch.testing.assert_close(packed(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_models_keep_the_default_layout_with_a_one_line_reason(capsys, monkeypatch):
    half = tiny(torch.float16)
    assert "float32 and bfloat16" in pack_for_decode(half)
    assert half.decode_layout == "linear" and not any(isinstance(m, PackedLinear) for m in half.modules())
    use_decode_layout(half, "packed", "aetheris generate")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not used" in err and "default layout" in err
    with torch.device("meta"):  # any device but the CPU (CUDA included) keeps its layout
        assert "CPU-only" in pack_for_decode(Aetheris(tiny_config()))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = tiny()
    assert "no oneDNN" in pack_for_decode(model)
    assert model.decode_layout == "linear"
    with pytest.raises(ValueError, match="not one of linear, packed, packed-head, compiled"):
        use_decode_layout(model, "transposed", "aetheris generate")


@needs_onednn
def test_packed_linear_refuses_gradients():
    w, x = torch.randn(8, 4), torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="inference only"):
        kernels.packed_linear(x, kernels.pack_weight(w))
    with torch.no_grad():
        torch.testing.assert_close(kernels.packed_linear(x, kernels.pack_weight(w)), x @ w.T)
        assert torch.equal(kernels.pack_weight(w).to_dense(), w)


@needs_onednn
def test_generate_and_serve_take_the_decode_layout_flag(tiny_tokenizer, tmp_path, capsys):
    from aetheris.cli import main
    from aetheris.serve import load_checkpoint

    model = Aetheris(tiny_config(tiny_tokenizer, max_seq_len=64)).eval()
    save_model(model, tmp_path, tokenizer=tiny_tokenizer)
    args = ["generate", "--model", str(tmp_path), "--prompt", "Hola", "--max-new-tokens", "8", "--no-stream"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    compiles = kernels.compiled_matvec_unsupported(torch.ones(1)) is None
    for layout in ["packed"] + ["compiled"] * compiles:
        assert main(args + ["--decode-layout", layout]) == 0
        out = capsys.readouterr()
        assert out.out == expected and out.err == "", layout
    served, _ = load_checkpoint(str(tmp_path), decode_layout="packed-head")
    assert served.decode_layout == "packed-head" and not served.training
    served, _ = load_checkpoint(str(tmp_path), dtype="float16", decode_layout="packed")
    assert served.decode_layout == "linear" and "float32 and bfloat16" in capsys.readouterr().err


@needs_onednn
def test_a_server_with_the_packed_layout_answers_like_the_default_one(tiny_tokenizer, tmp_path):
    """Through the HTTP server (its decode worker thread, batched prefill and steps): the same completions."""
    import openai
    from serve_helpers import LiveServer, tiny_checkpoint

    from aetheris.serve import create_app, load_checkpoint

    checkpoint = tiny_checkpoint(tiny_tokenizer, tmp_path / "tiny")
    answers = {}
    for layout in ("linear", "packed-head", "compiled"):
        model, tokenizer = load_checkpoint(str(checkpoint), decode_layout=layout)
        assert model.decode_layout == layout
        server = LiveServer(create_app(model, tokenizer, model_name="tiny"))
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hola"}],
                                               max_tokens=12, temperature=0, n=2)
            answers[layout] = [c.message.content for c in r.choices]
        finally:
            server.stop()
    assert len(answers["linear"]) == 2 and answers["packed-head"] == answers["linear"]
    assert answers["compiled"] == answers["linear"]


# --- the compiled layout ------------------------------------------------------------------------------------

needs_compile = pytest.mark.skipif(kernels.compiled_matvec_unsupported(torch.ones(1)) is not None,
                                   reason="torch.compile cannot build CPU kernels here (no C++ compiler?)")


def compiled_copy(model: Aetheris) -> Aetheris:
    compiled = copy.deepcopy(model)
    assert compile_for_decode(compiled) is None and compiled.decode_layout == "compiled"
    return compiled


@needs_compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_matvec_equals_f_linear_and_leaves_batches_and_gradients_to_it(dtype):
    torch.manual_seed(0)
    w = torch.randn(300, 700).to(dtype)
    x = torch.randn(1, 700).to(dtype)
    with torch.no_grad():
        got, expected = kernels.decode_linear(x, w), torch.nn.functional.linear(x, w)
        assert got.shape == (1, 300) and got.dtype == dtype
        # Both sum fp32 products; only the summation order differs, then one rounding to the output dtype.
        exact = x.double() @ w.double().T
        tol = 1e-5 if dtype == torch.float32 else 2 ** -8
        assert (got.double() - exact).abs().max() <= tol * exact.abs().max()
        assert (got.double() - exact).abs().max() <= 2 * (expected.double() - exact).abs().max() + 1e-6
        assert kernels.decode_linear(x[None], w).shape == (1, 1, 300)
        batch = torch.randn(3, 700).to(dtype)  # more than one row: F.linear itself
        assert torch.equal(kernels.decode_linear(batch, w), torch.nn.functional.linear(batch, w))
    wp = w.float().requires_grad_()
    kernels.decode_linear(x.float(), wp).sum().backward()  # autograd: F.linear, gradients reach the weight
    torch.testing.assert_close(wp.grad, x.float().expand(300, 700))


@needs_compile
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_decoding_equals_the_default_layout(variant):
    model = tiny(**VARIANTS[variant])
    compiled = compiled_copy(model)
    assert all(m.matvec for m in compiled.modules() if hasattr(m, "matvec"))
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Batch 1 takes the compiled matvec; batch 3 F.linear, except for an expert that one row was routed to.
        for rows in (tokens[:1], tokens):
            torch.testing.assert_close(step_logits(compiled, rows), step_logits(model, rows), rtol=1e-5, atol=1e-5)
    prompt = tokens[:1, :5]
    assert decode_ids(compiled, prompt, max_new_tokens=12) == decode_ids(model, prompt, max_new_tokens=12)


@needs_compile
def test_a_compiled_model_stays_a_normal_model(tmp_path):
    """No weight is copied or replaced: same state dict (the same tensors), training and its gradients as the
    default layout, checkpoints, moves; and it can still be packed."""
    model = tiny()
    compiled = compiled_copy(model)
    assert {k: v.data_ptr() for k, v in compiled.state_dict().items()} == {
        k: p.data_ptr() for k, p in compiled.named_parameters()} | {
        k: b.data_ptr() for k, b in compiled.named_buffers()}
    assert all(torch.equal(a, b) for a, b in zip(compiled.state_dict().values(), model.state_dict().values()))
    x = torch.randint(0, model.cfg.vocab_size, (1, 8))
    losses = []
    for m in (model, compiled):
        m.train()
        loss = m(x, labels=x).loss
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
        m.eval()
    assert torch.equal(losses[0][0], losses[1][0])
    assert all(torch.equal(a, b) for a, b in zip(losses[0][1], losses[1][1]))
    save_model(compiled, tmp_path)
    assert load_model(tmp_path).decode_layout == "linear"
    half = copy.deepcopy(compiled).to(torch.bfloat16)  # moves and casts work (the products follow the weights)
    with torch.no_grad():
        assert half.step(x[:, 0], half.empty_cache(1)).dtype == torch.bfloat16
    if torch.backends.mkldnn.is_available():  # packing a compiled model turns the compiled matvec off
        assert pack_for_decode(compiled) is None and compiled.decode_layout == "packed"
        assert not any(getattr(m, "matvec", False) for m in compiled.modules())
        assert "packed" in compile_for_decode(compiled)


def test_the_compiled_layout_falls_back_with_a_one_line_reason(capsys, monkeypatch):
    half = tiny(torch.float16)
    assert "float32 and bfloat16" in compile_for_decode(half)
    assert half.decode_layout == "linear"
    with torch.device("meta"):
        assert "CPU-only" in compile_for_decode(Aetheris(tiny_config()))

    def no_compiler():
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")
        return fail

    monkeypatch.setattr(kernels, "_compiled_matvec", no_compiler)
    model = tiny()
    reason = compile_for_decode(model)
    assert "could not build the matvec kernel" in reason and "C++ compiler" in reason
    assert model.decode_layout == "linear" and not any(getattr(m, "matvec", False) for m in model.modules())
    use_decode_layout(model, "compiled", "aetheris generate")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--decode-layout compiled not used" in err and "default layout" in err


# --- the compiled layout's column blocks for long rows ------------------------------------------------------

def test_column_blocks_round_trip_and_refuse_awkward_widths():
    w = torch.randn(6, 40)
    blocks = kernels.block_columns(w, block=16)
    assert blocks.shape == (4, 6, 10) and blocks.is_contiguous()  # 40 = 4 x 10: the first divisor with <= 16
    assert torch.equal(blocks[1], w[:, 10:20]) and torch.equal(kernels.unblock_columns(blocks), w)
    assert kernels.block_columns(torch.randn(3, 37), block=16) is None  # 37 is prime: blocks of 1 column
    with pytest.raises(RuntimeError, match="inference only"):
        kernels.blocked_linear(torch.randn(1, 40), blocks)


@needs_compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocked_matvec_equals_f_linear(dtype):
    torch.manual_seed(0)
    w = torch.randn(300, 1200).to(dtype)
    blocks = kernels.block_columns(w, block=256)
    assert blocks.shape == (5, 300, 240)
    with torch.no_grad():
        for rows in (1, 3):  # one row: the compiled blocked matvec; more: a batched product over the blocks
            x = torch.randn(rows, 1200).to(dtype)
            got, expected = kernels.blocked_linear(x, blocks), torch.nn.functional.linear(x, w)
            exact = x.double() @ w.double().T
            assert got.shape == (rows, 300) and got.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
            else:  # the partial sums of the blocks are rounded to bf16 once each before they are added
                assert (got.double() - exact).abs().max() <= 4 * (expected.double() - exact).abs().max() + 1e-6


@needs_compile
def test_compiled_with_blocked_experts_decodes_like_the_default_and_saves_a_normal_checkpoint(tmp_path):
    model = tiny(d_ff=64)
    compiled = copy.deepcopy(model)
    assert compile_for_decode(compiled, block_over=32, block=16) is None
    moes = [m for m in compiled.modules() if isinstance(m, MoE)]
    assert all(m.down_blocks.shape == (m.cfg.n_experts, 4, m.cfg.d_model, 16) and not hasattr(m, "w_down")
               for m in moes)
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for rows in (tokens[:1], tokens):
            torch.testing.assert_close(step_logits(compiled, rows), step_logits(model, rows), rtol=1e-5, atol=1e-5)
    assert decode_ids(compiled, tokens[:1, :5], max_new_tokens=12) == decode_ids(model, tokens[:1, :5],
                                                                                  max_new_tokens=12)
    state, expected = compiled.state_dict(), model.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    save_model(compiled, tmp_path)
    loaded = load_model(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    # The blocks replaced the weights: inference only, like a packed model.
    with pytest.raises(RuntimeError, match="inference only"):
        compiled.train()
    with pytest.raises(RuntimeError, match="inference only"):
        compiled(tokens, labels=tokens)
    with pytest.raises(RuntimeError, match="before packing"):
        compiled.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="unpacked model"):
        compiled.load_state_dict(expected)
    if torch.backends.mkldnn.is_available():  # packing takes the blocks back first
        assert pack_for_decode(compiled) is None and compiled.decode_layout == "packed"
        assert all(m.down_blocks is None for m in moes)
        assert all(torch.equal(a, b) for a, b in zip(compiled.state_dict().values(), expected.values()))
