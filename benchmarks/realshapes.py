"""Tiny Aya's shapes for the benchmarks: the teacher config, its student, bf16 models, bytes and FLOPs per token.

Shared by ``decode.py --real-shapes`` and ``throughput.py``. Nothing here downloads anything: the teacher is
transformers' ``Cohere2ForCausalLM`` built from Tiny Aya's config with random weights, and the student is the
Aetheris model that ``aetheris.transfer.student_config`` derives from it with the options of
``configs/tiny-aya-distill.yaml`` (12 pairs, 4 experts, top-1). ``tiny=True`` gives the same structure at
toy width (the smoke test and ``--quick``).
"""

from __future__ import annotations

import contextlib

import torch

from aetheris.model import Aetheris, MoE, SSMMixer
from aetheris.transfer import student_config

# configs/tiny-aya-distill.yaml's student.options (the ones that change shapes or per-token work).
STUDENT_OPTIONS = dict(gate="sigmoid", xbc_activation="identity", ssm_norm=False, n_experts=4, top_k=1,
                       router_weighting="renormalized")


def teacher_config(tiny: bool = False, layers: int | None = None):
    """Tiny Aya (CohereLabs/tiny-aya-global): 36 layers, [sliding x3, full] x 9, window 4096, GQA 16:4, head 128.

    ``layers`` cuts the depth (keeping the attention pattern) for reduced-depth runs."""
    from transformers import Cohere2Config

    if tiny:
        D, L, heads, kv, hd, Fh, V, window = 64, 4, 4, 2, 16, 176, 512, 16
    else:
        D, L, heads, kv, hd, Fh, V, window = 2048, 36, 16, 4, 128, 11008, 262_144, 4096
    L = layers or L
    pattern = ["sliding_attention"] * 3 + ["full_attention"]
    return Cohere2Config(
        vocab_size=V, hidden_size=D, intermediate_size=Fh, num_hidden_layers=L, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=hd, logit_scale=1.0, tie_word_embeddings=True, sliding_window=window,
        max_position_embeddings=1 << 17, layer_types=[pattern[i % 4] for i in range(L)],
        rope_parameters={"rope_type": "default", "rope_theta": 50_000.0},
        bos_token_id=2, eos_token_id=3, pad_token_id=0)


def student_cfg(tcfg, n_pairs: int | None = None):
    """The student of ``tcfg``: 12 pairs for Tiny Aya (or ``n_pairs``), the distill config's options."""
    pairs = n_pairs if n_pairs is not None else (None if tcfg.num_hidden_layers >= 12 else tcfg.num_hidden_layers)
    return student_config(tcfg, n_pairs=pairs, **STUDENT_OPTIONS)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype``: an fp32 Tiny Aya would need 13.4 GB before casting."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_teacher(tcfg, dtype: torch.dtype = torch.bfloat16):
    from transformers import Cohere2ForCausalLM

    tcfg._attn_implementation = "sdpa"
    with default_dtype(dtype):
        return Cohere2ForCausalLM(tcfg).eval()


def build_student(scfg, dtype: torch.dtype = torch.bfloat16) -> Aetheris:
    with default_dtype(dtype):
        model = Aetheris(scfg).eval()
    # Random routers at std 0.02 on random hidden states spread tokens over experts; A_log/dt_bias were
    # computed in `dtype` above, which only matters for values, not speed.
    return model


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def expert_bytes(model: Aetheris) -> int:
    """Bytes of one expert (gate, up, down) of one MoE layer."""
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    return sum(w[0].numel() * w.element_size() for w in (moe.w_gate, moe.w_up, moe.w_down))


def student_step_bytes(model: Aetheris, experts_used: list[int], state_bytes: int) -> int:
    """Bytes one decode step must read: every non-expert weight (the tied embedding is the LM head), the
    experts the step's rows were routed to (``experts_used`` per MoE layer) and the recurrent state."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    expert_params = sum(param_bytes(m) - m.router.weight.numel() * m.router.weight.element_size() for m in moes)
    return param_bytes(model) - expert_params + sum(experts_used) * expert_bytes(model) + state_bytes


def teacher_kv_tokens(tcfg, context: int) -> list[int]:
    """Tokens each layer's KV cache holds after ``context`` tokens: all of them in full-attention layers,
    the last window - 1 in sliding layers (transformers' DynamicSlidingWindowLayer keeps window - 1; the
    token being decoded is the window's last)."""
    return [context if t == "full_attention" else min(context, tcfg.sliding_window - 1) for t in tcfg.layer_types]


def teacher_kv_bytes(tcfg, context: int, batch: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV cache bytes: batch x tokens x (K and V) x kv heads x head_dim x element size, summed over layers."""
    per_token = 2 * tcfg.num_key_value_heads * tcfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return batch * per_token * sum(teacher_kv_tokens(tcfg, context))


def student_state_bytes(scfg, batch: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Recurrent state per SSM mixer: conv (d_conv - 1 inputs of d_xbc, model dtype) + SSM (H x P x N, fp32)."""
    n_ssm = scfg.layer_kinds.count("S")
    conv = (scfg.d_conv - 1) * scfg.d_xbc * torch.empty((), dtype=dtype).element_size()
    ssm = scfg.n_heads * scfg.head_dim * scfg.d_state * 4
    return batch * n_ssm * (conv + ssm)


def fill_teacher_cache(model, batch: int, context: int, dtype: torch.dtype = torch.bfloat16):
    """A transformers DynamicCache holding ``context`` tokens of random K/V per row, built by size instead of
    running the prefill (which would take minutes at 32k on a CPU): each layer gets the tensors it would
    hold (``teacher_kv_tokens``) and sliding layers are told how many tokens they have seen, so the next
    step's positions and masks are those of token ``context``."""
    from transformers import DynamicCache

    tcfg = model.config
    cache = DynamicCache(config=tcfg)
    for i, n in enumerate(teacher_kv_tokens(tcfg, context)):
        shape = (batch, tcfg.num_key_value_heads, n, tcfg.head_dim)
        k = torch.randn(shape, dtype=dtype)
        v = torch.randn(shape, dtype=dtype)
        layer = cache.layers[i]
        layer.update(k, v)
        if getattr(layer, "is_sliding", False):
            layer.cumulative_length = context
    return cache


def static_teacher_cache(model, filled, context: int, max_cache_len: int, consume: bool = False):
    """A transformers ``StaticCache`` holding what the DynamicCache ``filled`` holds after ``context`` tokens,
    with room for ``max_cache_len`` in full layers. A DynamicCache ``torch.cat``s every full layer's whole cache
    (and every sliding window) into a new tensor at each step, so its step time grows with the bytes it
    copies, not only with the bytes attention reads; a StaticCache writes the new token in place (its sliding
    layers, once full, still roll their window: one window copy per layer and step). Sliding layers hold
    the whole window here (one token more than DynamicCache keeps: the oldest, which the next token's mask
    leaves out), filled with random values. ``consume`` frees each of ``filled``'s layers once copied (peak
    memory: the cache plus one layer, not two caches)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for layer, src in zip(cache.layers, filled.layers):
        layer.lazy_initialization(src.keys, src.values)
        n = src.keys.shape[-2]
        if getattr(layer, "is_sliding", False):
            offset = layer.max_cache_len - n if context >= layer.max_cache_len else 0
            layer.keys[:, :, :offset].normal_()
            layer.values[:, :, :offset].normal_()
            layer.cumulative_length_int = context
            layer.cumulative_length.fill_(min(context, layer.max_cache_len))
        else:
            offset = 0
            layer.cumulative_length.fill_(n)
        layer.keys[:, :, offset:offset + n] = src.keys
        layer.values[:, :, offset:offset + n] = src.values
        if consume:
            src.keys = src.values = None
    return cache


def cache_tensor_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def fill_student_cache(model: Aetheris, batch: int):
    """The student's fixed-size state with random contents: its size (and step cost) is the same at any
    context, so no prefill is needed to reproduce a long context's cost."""
    cache = model.empty_cache(batch)
    for s in cache.states:
        s.conv.normal_()
        s.ssm.normal_(std=0.1)
    return cache


def linear_flops_per_token(n_params_in_matmuls: int) -> int:
    return 2 * n_params_in_matmuls


def teacher_flops_per_token(tcfg, context: int) -> float:
    """Forward FLOPs per token of a Cohere2 model, averaged over a ``context``-token causal prompt:
    2 x (matmul weights per layer) x layers, plus attention 2 x 2 x (keys attended) x heads x head_dim per
    layer (QK^T and PV), keys attended averaged over positions: (context + 1) / 2 in full layers,
    min(t, window) averaged in sliding ones. The LM head is left out (prefill keeps one position's logits)."""
    D, H, kv, hd, Fh = (tcfg.hidden_size, tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim,
                        tcfg.intermediate_size)
    per_layer = 2 * (D * H * hd + 2 * D * kv * hd + H * hd * D + 3 * D * Fh)
    attn = 0.0
    for t in tcfg.layer_types:
        if t == "full_attention":
            keys = (context + 1) / 2
        else:
            w = tcfg.sliding_window
            keys = sum(min(i + 1, w) for i in range(context)) / context
        attn += 4 * keys * H * hd
    return per_layer * tcfg.num_hidden_layers + attn


def student_flops_per_token(scfg) -> float:
    """Forward FLOPs per token of the student: 2 x (in_proj + out_proj + router + top-k experts) per pair,
    plus the chunked SSD scan: per head, with chunk L, N = d_state, P = head_dim, about
    2 x L x N (C.B^T, the chunk's row of it) + 2 x L x P (the intra-chunk product with x) + 4 x N x P
    (state out and in); conv and elementwise work are left out. LM head left out as for the teacher."""
    D, H, P, N, L = scfg.d_model, scfg.n_heads, scfg.head_dim, scfg.d_state, scfg.chunk_size
    n_pairs = scfg.layer_kinds.count("M")
    matmul = scfg.d_in_proj * D + D * scfg.d_inner + scfg.n_experts * D + scfg.top_k * 3 * D * scfg.d_ff
    scan = H * (2 * L * N + 2 * L * P + 4 * N * P)
    return n_pairs * (2 * matmul + scan)


def mem_available() -> int:
    """Bytes the kernel reports as available (MemAvailable), or a large number where /proc is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def fits(needed: int, margin: float = 1.1) -> str | None:
    """None if ``needed`` bytes (times a margin for temporaries) are available, else a one-line reason."""
    avail = mem_available()
    if needed * margin <= avail:
        return None
    return f"needs {needed * margin / 1e9:.1f} GB (incl. {margin - 1:.0%} margin), {avail / 1e9:.1f} GB available"


def ssm_mixers(model: Aetheris) -> list[SSMMixer]:
    return [m for m in model.modules() if isinstance(m, SSMMixer)]
