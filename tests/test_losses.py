"""Distillation losses are equivalences: KL(p||p) = 0, KL >= 0, chunked == unchunked, padding never counts,
per-token (not batchmean) reduction, top-k cache KL with k = V == full KL, gradients through checkpointed chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aetheris.losses import (
    KINDS,
    cached_distill_loss,
    chunked_divergence,
    distill_loss,
    per_group_mean,
    token_divergence,
    topk_kl,
    topk_teacher,
    valid_positions,
)


def _logits(seed, shape=(3, 17, 50), scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_divergence_of_a_distribution_with_itself_is_zero_and_otherwise_positive():
    a, b = _logits(0), _logits(1)
    for kind in KINDS:
        assert token_divergence(a, a, kind).abs().max() < 1e-5
        d = token_divergence(a, b, kind, temperature=2.0)
        assert (d >= -1e-6).all() and d.mean() > 0.01


def test_forward_kl_matches_torch_kl_div_per_token():
    a, b = _logits(2), _logits(3)
    ref = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_divergence(a, b, "forward"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(token_divergence(a, b, "reverse"), token_divergence(b, a, "forward"))


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_values_and_gradients(kind):
    t = _logits(4)
    labels = torch.randint(0, 50, (3, 17))
    labels[1, 9:] = -100
    grads = []
    values = []
    for chunk in (1000, 5, 1):
        s = _logits(5).requires_grad_(True)
        loss = distill_loss(t, s, labels, kind, temperature=1.7, chunk=chunk)
        loss.backward()
        values.append(loss.detach())
        grads.append(s.grad)
    for v, g in zip(values[1:], grads[1:]):
        torch.testing.assert_close(v, values[0])
        torch.testing.assert_close(g, grads[0])


def test_padding_and_masked_positions_never_contribute():
    t, s = _logits(6), _logits(7)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, 10:] = -100
    base = distill_loss(t, s, labels)
    t2, s2 = t.clone(), s.clone()
    t2[0, 9:] = torch.randn(8, 50) * 10  # position 9 predicts label 10 (masked), so 9.. are free to change
    s2[0, 9:] = torch.randn(8, 50) * 10
    torch.testing.assert_close(distill_loss(t2, s2, labels), base)
    s3 = s.clone().requires_grad_(True)
    distill_loss(t, s3, labels).backward()
    assert s3.grad[0, 9:].abs().max() == 0 and s3.grad[:, -1].abs().max() == 0


def test_mean_is_per_valid_token_not_batchmean():
    t, s = _logits(8), _logits(9)
    labels = torch.randint(0, 50, (3, 17))
    labels[2, 4:] = -100
    mask = valid_positions(labels)
    per_tok = token_divergence(t, s)
    expected = per_tok[mask].mean()
    torch.testing.assert_close(distill_loss(t, s, labels), expected)
    assert int(mask.sum()) == 2 * 16 + 3


def test_temperature_scales_by_tau_squared():
    t, s = _logits(10), _logits(11)
    labels = torch.randint(0, 50, (3, 17))
    per_pos, n = chunked_divergence(t, s, valid_positions(labels), temperature=2.0)
    torch.testing.assert_close(distill_loss(t, s, labels, temperature=2.0), 4.0 * per_pos.sum() / n)


def test_vocabulary_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same vocabulary"):
        distill_loss(_logits(0, (1, 4, 50)), _logits(0, (1, 4, 51)), torch.zeros(1, 4, dtype=torch.long))


def test_topk_cache_with_k_equal_v_is_the_full_kl_and_a_lower_bound_otherwise():
    t, labels = _logits(12), torch.randint(0, 50, (3, 17))
    s = _logits(13)
    full = distill_loss(t, s, labels, temperature=1.5)
    values, ids, tail = topk_teacher(t, k=50, temperature=1.5)
    torch.testing.assert_close(cached_distill_loss(values, ids, tail, s, labels, temperature=1.5), full,
                               atol=1e-5, rtol=1e-5)
    for k in (1, 5, 20):
        values, ids, tail = topk_teacher(t, k=k, temperature=1.5)
        approx = cached_distill_loss(values, ids, tail, s, labels, temperature=1.5)
        assert 0 <= approx <= full + 1e-6
        assert topk_kl(values, ids, tail, t, temperature=1.5).abs().max() < 1e-4  # KL(p||p) = 0 in the cache too


def test_cached_loss_gradients_through_chunks():
    t, labels = _logits(14), torch.randint(0, 50, (3, 17))
    values, ids, tail = topk_teacher(t, k=8)
    grads = []
    for chunk in (100, 3):
        s = _logits(15).requires_grad_(True)
        cached_distill_loss(values, ids, tail, s, labels, chunk=chunk).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_per_group_mean():
    per_pos = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    groups = torch.tensor([[0, 0, 1], [2, 2, 2]])
    means, counts = per_group_mean(per_pos, mask, groups, 4)
    torch.testing.assert_close(means, torch.tensor([1.5, 0.0, 5.0, 0.0]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 0.0, 2.0, 0.0]))


def test_teacher_cache_round_trip_and_k_equal_v_matches_the_online_loss(tiny_cohere2_teacher, tmp_path):
    import json as _json

    from aetheris.teacher_cache import CacheStream, write_cache

    class Rows:  # a deterministic stand-in for PackedStream
        def __init__(self):
            self.gen = torch.Generator().manual_seed(0)

        def next_batch(self, n):
            ids = torch.randint(5, 700, (n, 12), generator=self.gen)
            labels = ids.clone()
            labels[:, 0] = -100
            return {"input_ids": ids.numpy(), "labels": labels.numpy(), "doc_ids": torch.zeros(n, 12, dtype=torch.long).numpy(),
                    "lang_ids": torch.zeros(n, 12, dtype=torch.long).numpy()}

    V = tiny_cohere2_teacher.config.vocab_size
    folder = write_cache(tiny_cohere2_teacher, Rows(), tmp_path / "cache", rows=5, k=V, batch_size=2, shard_rows=3)
    meta = _json.loads((folder / "cache.json").read_text())
    assert [s["rows"] for s in meta["shards"]] == [3, 2] and meta["k"] == V
    stream = CacheStream(folder)
    stream.next_batch(1)
    state = stream.state_dict()
    a = stream.next_batch(3)
    stream.load_state_dict(state)
    b = stream.next_batch(3)
    assert all((a[key] == b[key]).all() for key in a)
    batch = {key: torch.as_tensor(v) for key, v in a.items()}
    student_logits = torch.randn(3, 12, V, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        online = distill_loss(tiny_cohere2_teacher(input_ids=batch["input_ids"]).logits, student_logits, batch["labels"])
    cached = cached_distill_loss(batch["t_values"], batch["t_ids"], batch["t_tail"], student_logits, batch["labels"])
    torch.testing.assert_close(cached, online, atol=2e-3, rtol=2e-3)  # fp16 log-probs in the cache


def _reference_per_position(t, s, mask, kind, temperature):
    """The textbook formula through autograd: ``token_divergence`` on the whole tensors, masked."""
    d = token_divergence(t.detach(), s, kind, temperature)
    return torch.where(mask, d, torch.zeros_like(d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_chunked_divergence_equals_the_reference_formula_values_and_gradients(kind, dtype):
    """``chunked_divergence`` (blocked rows, closed-form gradient, nothing saved but log-normalisers) against
    autograd through ``token_divergence``: per-position values and the student gradient under a non-uniform
    upstream gradient (as group-DRO weights give), with masked rows, τ != 1, several chunk sizes, fp32 and bf16."""
    t = _logits(20, (2, 9, 37)).to(dtype)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2] = False
    weights = torch.rand(2, 9, generator=torch.Generator().manual_seed(21)) + 0.5
    s_ref = _logits(22, (2, 9, 37)).to(dtype).requires_grad_(True)
    ref = _reference_per_position(t, s_ref, mask, kind, 1.7)
    (ref * weights).sum().backward()
    for chunk in (256, 4, 1):
        s = s_ref.detach().clone().requires_grad_(True)
        per_pos, n = chunked_divergence(t, s, mask, kind, temperature=1.7, chunk=chunk)
        assert per_pos.dtype == torch.float32 and int(n) == int(mask.sum())
        torch.testing.assert_close(per_pos, ref.detach(), atol=1e-5, rtol=1e-5)
        (per_pos * weights).sum().backward()
        assert s.grad.dtype == dtype and s.grad[~mask].abs().max() == 0
        # bf16: both round the same fp32 gradient once, so they differ by at most one bf16 step
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-6, rtol=2 ** -7)
        torch.testing.assert_close(s.grad.float(), s_ref.grad.float(), **tol)


def test_fast_chunked_divergence_without_gradients_and_with_a_bad_kind():
    t, s = _logits(23), _logits(24)
    mask = torch.ones(3, 17, dtype=torch.bool)
    with torch.no_grad():
        per_pos, _ = chunked_divergence(t, s, mask, "jsd", temperature=0.5)
    torch.testing.assert_close(per_pos, token_divergence(t, s, "jsd", 0.5), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        chunked_divergence(t, s, mask, "kl")
