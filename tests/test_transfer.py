"""Stage 1 weight transfer: the mapping algebra (transferred mixer == causal linear attention from the
teacher's own Q/K/V/O, GQA per head), upcycled MoE == teacher MLP, full-scale mapping on meta, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from aetheris.config import AetherisConfig
from aetheris.model import Aetheris
from aetheris.transfer import check_compatible, layer_map, pair_modules, student_config, transfer, unmapped

EXACT = dict(gate="sigmoid", xbc_activation="identity", ssm_norm=False, chunk_size=8)


def _transferred(teacher, attention_scale=True, **kw):
    teacher = copy.deepcopy(teacher).double()
    cfg = student_config(teacher.config, n_pairs=teacher.config.num_hidden_layers, **{**EXACT, **kw})
    torch.manual_seed(0)
    student = Aetheris(cfg).double()
    sources = transfer(teacher, student, attention_scale=attention_scale)
    return teacher, student, sources


def _no_decay(mixer):
    """A = 0 (A_log = -inf), dt = softplus(log(e-1)) = 1, D = 0: the scan becomes a plain causal sum."""
    with torch.no_grad():
        mixer.A_log.fill_(-math.inf)
        mixer.dt_bias.fill_(math.log(math.e - 1))
        mixer.D.zero_()


def linear_attention(attn, u, expand="head", scale=1.0):
    """y_t = W_O · Σ_{s≤t} scale·(q_t·k_s) v_s from raw projections (no RoPE, no softmax)."""
    B, T, _ = u.shape
    H, KV = attn.config.num_attention_heads, attn.config.num_key_value_heads
    hd, R = attn.head_dim, H // KV
    q = attn.q_proj(u).view(B, T, H, hd)
    if expand == "head":   # repeat_kv: query head h reads kv head h // R
        k = attn.k_proj(u).view(B, T, KV, hd).repeat_interleave(R, dim=2)
        v = attn.v_proj(u).view(B, T, KV, hd).repeat_interleave(R, dim=2)
    else:                  # the bug to catch: every row of W_K / W_V repeated R times, then cut into heads
        k = attn.k_proj(u).repeat_interleave(R, dim=-1).view(B, T, H, hd)
        v = attn.v_proj(u).repeat_interleave(R, dim=-1).view(B, T, H, hd)
    scores = scale * torch.einsum("bthd,bshd->bhts", q, k).tril()   # causal: s <= t
    y = torch.einsum("bhts,bshd->bthd", scores, v).reshape(B, T, H * hd)
    return attn.o_proj(y)


@pytest.mark.parametrize("attention_scale", [False, True])
@pytest.mark.parametrize("layer", [0, 3])  # a sliding (RoPE) layer and a full layer: raw projections either way
def test_transferred_mixer_is_causal_linear_attention(tiny_cohere2_teacher, layer, attention_scale):
    teacher, student, sources = _transferred(tiny_cohere2_teacher, attention_scale=attention_scale)
    _, mixer, _ = pair_modules(student, layer)
    _no_decay(mixer)
    u = torch.randn(2, 21, teacher.config.hidden_size, dtype=torch.float64) * 0.5  # 21: spans 3 scan chunks
    y, _ = mixer(u)
    attn = teacher.model.layers[layer].self_attn
    # Scaled (the default): the kernel is the teacher's own attention logit q·k / sqrt(head_dim).
    scale = attn.head_dim ** -0.5 if attention_scale else 1.0
    torch.testing.assert_close(y, linear_attention(attn, u, scale=scale), rtol=1e-10, atol=1e-10)
    if attention_scale:
        assert not torch.allclose(y, linear_attention(attn, u), rtol=1e-3, atol=1e-6)
        assert any("attention scaling" in src for src in sources.values())


def test_gqa_is_expanded_per_head_not_per_row(tiny_cohere2_teacher):
    teacher, student, _ = _transferred(tiny_cohere2_teacher)
    assert teacher.config.num_key_value_heads < teacher.config.num_attention_heads  # GQA in play
    _, mixer, _ = pair_modules(student, 0)
    _no_decay(mixer)
    u = torch.randn(1, 9, teacher.config.hidden_size, dtype=torch.float64)
    y, _ = mixer(u)
    attn = teacher.model.layers[0].self_attn
    s = attn.head_dim ** -0.5
    per_head, per_row = linear_attention(attn, u, "head", s), linear_attention(attn, u, "row", s)
    assert (per_head - per_row).abs().max() > 1e-3 * per_head.abs().max()  # the two expansions really differ
    torch.testing.assert_close(y, per_head, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y, per_row, rtol=1e-6, atol=1e-6)


def test_pass_through_gate_and_identity_conv(tiny_cohere2_teacher):
    _, student, _ = _transferred(tiny_cohere2_teacher)
    _, mixer, _ = pair_modules(student, 1)
    H, P = student.cfg.n_heads, student.cfg.head_dim
    assert torch.all(mixer.in_proj.weight[: H * P] == 0) and torch.all(mixer.in_proj.weight[-H:] == 0)
    assert torch.all(mixer.conv_weight[:, -1] == 1) and torch.all(mixer.conv_weight[:, :-1] == 0)
    assert torch.all(mixer.conv_bias == 0) and torch.all(mixer.D == 0)


@pytest.mark.parametrize("parallel", [False, True])
def test_upcycled_moe_equals_teacher_mlp_exactly(tiny_cohere2_teacher, parallel):
    teacher, student, _ = _transferred(tiny_cohere2_teacher, parallel_pairs=parallel, router_weighting="renormalized",
                                       top_k=1)
    x = torch.randn(3, 17, teacher.config.hidden_size, dtype=torch.float64)
    for k in range(teacher.config.num_hidden_layers):
        _, _, moe = pair_modules(student, k)
        out, _ = moe(x)
        ref = teacher.model.layers[k].mlp(x)
        # Same function, same weights; the only freedom left is fp64 summation order (BLAS may block the experts'
        # per-group GEMMs differently from one GEMM over every token, depending on sizes and threads).
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-14)


def test_norms_embeddings_logit_scale_copied(tiny_cohere2_teacher):
    teacher, student, sources = _transferred(tiny_cohere2_teacher)
    assert student.cfg.logit_scale == teacher.config.logit_scale == 0.5
    assert student.cfg.norm == "layernorm" and student.cfg.tie_embeddings
    assert torch.equal(student.embed.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.norm_f.weight, teacher.model.norm.weight)
    norms, _, _ = pair_modules(student, 2)
    assert all(torch.equal(n.weight, teacher.model.layers[2].input_layernorm.weight) for n in norms)
    assert unmapped(student, sources) == []
    # Same embeddings, head and final norm: logits of a shared final hidden state agree (to fp32, because
    # Cohere2LayerNorm always normalises in fp32 even in an fp64 model).
    h = torch.randn(1, 4, teacher.config.hidden_size, dtype=torch.float64)
    ref = teacher.lm_head(teacher.model.norm(h)) * teacher.config.logit_scale
    torch.testing.assert_close(student.logits(h), ref, rtol=1e-5, atol=1e-6)


def test_layer_map_groups_and_init():
    m = layer_map(36)
    assert len(m) == 12 and [p.layers for p in m][:2] == [range(0, 3), range(3, 6)]
    assert [p.init for p in m][:3] == [2, 5, 8] and m[-1].layers == range(33, 36)
    assert [p.init for p in layer_map(36, init="first")][:2] == [0, 3]
    assert [(p.first, p.last) for p in layer_map(4, 4)] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert [(p.first, p.last) for p in layer_map(5, 2)] == [(0, 2), (3, 4)]
    with pytest.raises(ValueError, match="n_pairs"):
        layer_map(4, 5)


def tiny_aya_config():
    from transformers import Cohere2Config

    return Cohere2Config(
        vocab_size=262_144, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, logit_scale=1.0, tie_word_embeddings=True,
        sliding_window=4096, max_position_embeddings=8192, layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 9,
        rope_parameters={"rope_type": "default", "rope_theta": 50_000.0},
    )


@pytest.mark.parametrize("parallel", [False, True])
def test_full_scale_mapping_on_meta(parallel):
    from transformers import Cohere2ForCausalLM

    tcfg = tiny_aya_config()
    with torch.device("meta"):
        teacher = Cohere2ForCausalLM(tcfg)
        scfg = student_config(tcfg, parallel_pairs=parallel)
        student = Aetheris(scfg)
    assert sum(p.numel() for p in teacher.parameters()) == 3_349_227_520
    assert scfg.n_layer == 24 and (scfg.n_heads, scfg.head_dim, scfg.d_state, scfg.n_groups) == (16, 128, 128, 4)
    sources = transfer(teacher, student)
    assert unmapped(student, sources) == []
    counts = scfg.param_counts()
    assert student.num_parameters() == counts["total"]
    assert abs(counts["total"] - 3.96e9) < 0.01e9 and abs(counts["active"] - 1.52e9) < 0.01e9
    if not parallel:
        assert counts == {"total": 3_960_175_168, "active": 1_525_381_696}
    ssm, moe = ("layers.0.ssm", "layers.11.moe") if parallel else ("layers.0.mixer", "layers.23.mixer")
    # in_proj rows: z 2048 | x 512 | B 512 | C 2048 | dt 16; pair 0 is initialised from teacher layer 2.
    assert sources[f"{ssm}.in_proj.weight[2560:3072]"] == "model.layers.2.self_attn.k_proj.weight"
    assert sources[f"{moe}.w_down"].startswith("model.layers.35.mlp.down_proj.weight")


def test_unsupported_teacher_lists_supported():
    from transformers import GPT2Config

    from aetheris.teacher import TeacherError, check_supported

    with pytest.raises(TeacherError, match="Cohere2ForCausalLM.*LlamaForCausalLM"):
        check_supported(GPT2Config())


@pytest.mark.parametrize("field,value", [("n_heads", 8), ("vocab_size", 1000), ("d_model", 96), ("n_groups", 4)])
def test_incompatible_student_names_the_field(tiny_cohere2_teacher, field, value):
    tcfg = tiny_cohere2_teacher.config
    good = student_config(tcfg, n_pairs=2).to_dict()
    good[field] = value
    if field == "n_heads":
        good["n_groups"] = 2
    bad = AetherisConfig.from_dict(good)
    with pytest.raises(ValueError, match=field):
        check_compatible(tcfg, bad)
    with pytest.raises(ValueError, match=field):  # transfer refuses before copying anything
        transfer(tiny_cohere2_teacher, Aetheris(bad))


def test_llama_teacher_transfers_with_rmsnorm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tcfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    teacher = LlamaForCausalLM(tcfg).double().eval()
    scfg = student_config(tcfg, n_pairs=2, **EXACT)
    assert scfg.norm == "rmsnorm" and not scfg.tie_embeddings and scfg.logit_scale == 1.0
    student = Aetheris(scfg).double()
    sources = transfer(teacher, student)
    assert unmapped(student, sources) == []
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.layers[1].norm.weight, teacher.model.layers[0].post_attention_layernorm.weight)
    _, mixer, _ = pair_modules(student, 1)
    _no_decay(mixer)
    u = torch.randn(1, 10, 32, dtype=torch.float64)
    ref = linear_attention(teacher.model.layers[1].self_attn, u, scale=8 ** -0.5)  # head_dim 8
    torch.testing.assert_close(mixer(u)[0], ref, rtol=1e-10, atol=1e-10)


def test_span_dt_init_follows_each_layers_attention_span(tiny_cohere2_teacher):
    teacher = tiny_cohere2_teacher
    cfg = student_config(teacher.config, n_pairs=4, **EXACT)
    student = Aetheris(cfg)
    sources = transfer(teacher, student, dt_init="span")
    for k, span in enumerate([32, 32, 32, 256]):  # sliding window on layers 0-2, full context on layer 3
        _, mixer, _ = pair_modules(student, k)
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert torch.all(mixer.A_log == 0)          # A = -1: decay per step exp(-dt)
        torch.testing.assert_close(torch.exp(-dt * span), torch.full_like(dt, 0.01))
    assert unmapped(student, sources) == []


def test_expert_noise_makes_experts_differ_but_stay_close(tiny_cohere2_teacher):
    cfg = student_config(tiny_cohere2_teacher.config, n_pairs=2, **EXACT)
    student = Aetheris(cfg)
    transfer(tiny_cohere2_teacher, student, expert_noise=0.01)
    _, _, moe = pair_modules(student, 0)
    w = tiny_cohere2_teacher.model.layers[1].mlp.up_proj.weight
    assert not torch.equal(moe.w_up[0], moe.w_up[1])
    assert float((moe.w_up - w).detach().std()) == pytest.approx(0.01 * float(w.std()), rel=0.1)


def test_transfer_refuses_a_gate_that_kills_the_transferred_mixers(tiny_cohere2_teacher):
    tcfg = tiny_cohere2_teacher.config
    # Why: with the z rows zeroed a silu gate multiplies every transferred mixer's output by silu(0) = 0.
    silu = Aetheris(student_config(tcfg, n_pairs=2, gate="silu"))
    transfer_rows = pair_modules(silu, 0)[1].in_proj.weight[: silu.cfg.d_inner]
    assert torch.nn.functional.silu(torch.zeros(1)).item() == 0.0 and transfer_rows.shape[0] > 0
    with pytest.raises(ValueError, match="gate='silu'.*student.options.gate=sigmoid"):
        transfer(tiny_cohere2_teacher, silu)
    # The default student config uses the pass-through gate: its transferred mixers are alive.
    student = Aetheris(student_config(tcfg, n_pairs=2))
    assert student.cfg.gate == "sigmoid"
    transfer(tiny_cohere2_teacher, student)
    mixer = pair_modules(student, 0)[1]
    y, _ = mixer(torch.randn(1, 7, tcfg.hidden_size))
    assert y.abs().max() > 0
