"""Equivalences of the Aetheris model: decoding vs full forward, causality, packing, MoE, gradients."""

import dataclasses

import pytest
import torch

from conftest import tiny_config
from aetheris.config import AetherisConfig
from aetheris.model import Aetheris, MoE

def tiny(seed=0, dtype=torch.float64, **overrides) -> Aetheris:
    torch.manual_seed(seed)
    return Aetheris(tiny_config(**overrides)).to(dtype).eval()


def ids(b=2, T=29, seed=1, vocab=101):
    return torch.randint(0, vocab, (b, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", [{}, {"parallel_pairs": True}, {"top_k": 2}, {"layout": "SSM", "n_layer": 6},
                                     {"xbc_activation": "identity", "gate": "sigmoid", "ssm_norm": False},
                                     {"norm": "rmsnorm", "logit_scale": 0.5, "tie_embeddings": False}])
@pytest.mark.parametrize("b", [1, 2])  # batch 1 takes MoE.step's direct path, batch 2 the sorted dispatch
def test_step_decoding_equals_full_forward(variant, b):
    model = tiny(**variant)
    x = ids(b=b)
    full = model(x).logits
    prefix = model(x[:, :11])
    cache, logits = prefix.cache, [prefix.logits[:, -1]]
    for t in range(11, x.shape[1] - 1):
        logits.append(model.step(x[:, t], cache))
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 10:-1], rtol=1e-9, atol=1e-9)


def test_cache_size_does_not_grow_with_context():
    model = tiny()
    short, long = model(ids(T=5)).cache, model(ids(T=300)).cache
    assert short.nbytes() == long.nbytes() > 0


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny()
    x = ids()
    y = x.clone()
    y[:, 17:] = (y[:, 17:] + 1) % 101
    torch.testing.assert_close(model(x).logits[:, :17], model(y).logits[:, :17])
    assert not torch.allclose(model(x).logits[:, 17:], model(y).logits[:, 17:])


def test_packed_documents_equal_separate_documents():
    model = tiny()
    a, b = ids(b=1, T=13, seed=2), ids(b=1, T=21, seed=3)
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 13 + [1] * 21])
    out = model(packed, doc_ids=doc_ids).logits
    torch.testing.assert_close(out[:, :13], model(a).logits)
    torch.testing.assert_close(out[:, 13:], model(b).logits)


def test_left_padding_equals_unpadded():
    model = tiny()
    x = ids(b=1, T=9)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], 1).long()
    out = model(padded, attention_mask=mask)
    torch.testing.assert_close(out.logits[:, 5:], model(x).logits)
    ref_cache = model(x).cache
    for s, r in zip(out.cache.states, ref_cache.states):
        torch.testing.assert_close(s.ssm, r.ssm)
        torch.testing.assert_close(s.conv, r.conv)


def test_moe_with_identical_experts_equals_one_dense_mlp():
    cfg = tiny_config(top_k=1)
    torch.manual_seed(0)
    moe = MoE(cfg).double()
    with torch.no_grad():
        for w in (moe.w_gate, moe.w_up, moe.w_down):
            w.normal_(std=0.1)
            w.copy_(w[:1].expand_as(w))
        moe.router.weight.normal_()
    x = torch.randn(3, 7, cfg.d_model, dtype=torch.float64)
    y, _ = moe(x)
    dense = torch.nn.functional.silu(x @ moe.w_gate[0].T) * (x @ moe.w_up[0].T) @ moe.w_down[0].T
    torch.testing.assert_close(y, dense)
    assert moe.last_load.sum().item() == pytest.approx(1.0)


def test_moe_top2_combines_two_experts_with_renormalised_weights():
    cfg = tiny_config(top_k=2)
    torch.manual_seed(0)
    moe = MoE(cfg).double()
    with torch.no_grad():
        for w in (moe.w_gate, moe.w_up, moe.w_down, moe.router.weight):
            w.normal_(std=0.3)
    x = torch.randn(11, cfg.d_model, dtype=torch.float64)
    y, _ = moe(x[None])
    probs = (x @ moe.router.weight.T).softmax(-1)
    top_p, top_i = probs.topk(2, -1)
    expected = torch.zeros_like(x)
    for m in range(11):
        for k in range(2):
            e = top_i[m, k]
            h = torch.nn.functional.silu(x[m] @ moe.w_gate[e].T) * (x[m] @ moe.w_up[e].T)
            expected[m] += top_p[m, k] / top_p[m].sum() * (h @ moe.w_down[e].T)
    torch.testing.assert_close(y[0], expected)


@pytest.mark.parametrize("weighting", ["renormalized", "softmax"])
def test_router_gets_gradient_from_the_lm_loss_at_top1(weighting):
    model = tiny(router_weighting=weighting, aux_loss_coef=0.0, z_loss_coef=0.0).train()
    x = ids()
    model(x, labels=x).loss.backward()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_renormalized_top1_weight_is_exactly_one():
    cfg = tiny_config()
    moe = MoE(cfg)
    _, weights, _ = moe.route(torch.randn(5, cfg.d_model))
    assert torch.equal(weights, torch.ones_like(weights))


def test_load_balance_loss_is_minimal_for_uniform_routing():
    cfg = tiny_config(aux_loss_coef=1.0, z_loss_coef=0.0)
    moe = MoE(cfg)
    E = cfg.n_experts
    # Uniform: each expert gets 1/E of the tokens and mean prob 1/E -> alpha * E * E * (1/E)^2 = alpha.
    uniform_logits = torch.zeros(8, E)
    balanced = torch.arange(8).remainder(E)[:, None]
    assert moe.aux_loss(uniform_logits, balanced).item() == pytest.approx(1.0)
    # All tokens on expert 0 with confident probabilities -> much larger.
    skew_logits = torch.zeros(8, E)
    skew_logits[:, 0] = 5.0
    assert moe.aux_loss(skew_logits, torch.zeros(8, 1, dtype=torch.long)).item() > 3.0
    # z-loss: mean(logsumexp^2), scaled once by its own coefficient.
    cfg_z = dataclasses.replace(cfg, aux_loss_coef=0.0, z_loss_coef=0.5)
    logits = torch.randn(8, E)
    expected = 0.5 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(MoE(cfg_z).aux_loss(logits, balanced), expected)


def test_aux_loss_is_included_once_in_the_total_loss():
    model = tiny()
    x = ids()
    out = model(x, labels=x)
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    per_layer = []
    h = model.embed(x)
    for layer in model.layers:
        h, aux, _ = layer(h, None, None)
        per_layer.append(aux)
    torch.testing.assert_close(out.aux_loss, sum(per_layer).to(out.aux_loss.dtype))


def test_gradient_checkpointing_gives_equal_gradients():
    x = ids()
    grads = []
    for ckpt in (False, True):
        model = tiny(gradient_checkpointing=ckpt).train()
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_labels_are_shifted_once_and_ignore_index_is_respected():
    model = tiny()
    x = ids()
    labels = x.clone()
    labels[:, :10] = -100
    out = model(x, labels=labels)
    logits = model(x).logits
    manual = torch.nn.functional.cross_entropy(logits[:, 9:-1].reshape(-1, 101), x[:, 10:].reshape(-1))
    torch.testing.assert_close(out.ce_loss, manual)


def test_param_groups_exclude_tagged_parameters_from_decay():
    model = tiny()
    decay, no_decay = model.param_groups(0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay_ids}
    assert any(n.endswith("A_log") for n in names) and any(n.endswith("dt_bias") for n in names)
    assert any(n.endswith(".D") for n in names) and any("norm" in n for n in names)
    assert not any(n.endswith("in_proj.weight") or "w_gate" in n for n in names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_parameter_count_formula_matches_the_module():
    for variant in ({}, {"parallel_pairs": True}, {"tie_embeddings": False, "ssm_norm": False}):
        model = tiny(**variant)
        assert model.cfg.param_counts()["total"] == model.num_parameters()


def test_tiny_aya_student_size_on_meta_device():
    cfg = AetherisConfig()  # the real-scale defaults
    with torch.device("meta"):
        model = Aetheris(cfg)
    counts = cfg.param_counts()
    assert model.num_parameters() == counts["total"]
    assert counts["total"] / 1e9 == pytest.approx(3.96, abs=0.01)
    assert counts["active"] / 1e9 == pytest.approx(1.52, abs=0.01)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_heads=6, n_groups=4), "n_groups"),
    (dict(layout="SX"), "layout"),
    (dict(top_k=5, n_experts=4), "top_k"),
    (dict(n_layer=5, layout="SM"), "n_layer"),
    (dict(norm="batchnorm"), "norm"),
    (dict(d_model=0), "d_model"),
])
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"AetherisConfig.{field}"):
        tiny_config(**kwargs)


def test_unknown_config_key_suggests_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'n_experts'"):
        AetherisConfig.from_dict({"n_expert": 4})
