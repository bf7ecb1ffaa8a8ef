"""Documents kept apart and padding left out in distillation: a packed row's per-token KL equals that of its
documents run separately (teacher and student, online and from a teacher cache); a teacher that lets documents
see each other is refused; padding counts in neither the MoE balance loss / expert load nor the stage-1 MSE;
the held-out KL counts the positions the labels name; the loss that trains is ``losses.distill_loss`` /
``cached_distill_loss`` (+ CE and aux), and its group-DRO objective the q-weighted mean of per-family
``distill_loss``es."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_config
from aetheris.distill import FamilyDRO, heldout_kl, make_kd_loss, normalised_mse, pair_forward
from aetheris.losses import cached_distill_loss, chunked_divergence, distill_loss, topk_teacher, valid_positions
from aetheris.model import Aetheris
from aetheris.teacher import DocumentMaskError, check_documents_kept_apart, document_positions, teacher_logits
from aetheris.transfer import layer_map, student_config, transfer

LENGTHS = (37, 45)  # both longer than the tiny teacher's sliding window (32): the sliding layers are exercised


@pytest.fixture(scope="module")
def student(tiny_cohere2_teacher):
    scfg = student_config(tiny_cohere2_teacher.config, n_pairs=2, xbc_activation="identity", ssm_norm=False)
    torch.manual_seed(0)
    model = Aetheris(scfg).eval()
    transfer(tiny_cohere2_teacher, model, layer_map(tiny_cohere2_teacher.config.num_hidden_layers, 2), expert_noise=0.1)
    return model


def _docs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, n), generator=g) for n in LENGTHS]


def _row(docs):
    """One packed row as PackedStream builds it: labels -100 at every document's first token."""
    ids = torch.cat(docs, 1)
    doc_ids = torch.cat([torch.full_like(d, i) for i, d in enumerate(docs)], 1)
    labels = ids.clone()
    starts = torch.cumsum(torch.tensor([0, *[d.shape[1] for d in docs[:-1]]]), 0)
    labels[0, starts] = -100
    return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids}


def _alone(doc):
    labels = doc.clone()
    labels[0, 0] = -100
    return {"input_ids": doc, "labels": labels, "doc_ids": torch.zeros_like(doc)}


def test_document_positions_restart_at_every_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_teacher_scores_each_packed_document_as_if_alone(tiny_cohere2_teacher, attn):
    teacher = copy.deepcopy(tiny_cohere2_teacher)
    teacher.config._attn_implementation = attn
    docs = _docs(teacher.config.vocab_size)
    row = _row(docs)
    with torch.no_grad():
        packed = teacher_logits(teacher, row["input_ids"], row["doc_ids"])
        across = teacher(input_ids=row["input_ids"]).logits
        alone = [teacher(input_ids=d).logits for d in docs]
    a = LENGTHS[0]
    torch.testing.assert_close(packed[:, :a], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, a:], alone[1], rtol=1e-5, atol=1e-5)
    assert (across[:, a:] - alone[1]).abs().max() > 0.05  # without separation the second document sees the first
    check_documents_kept_apart(teacher)


def test_packed_row_kd_loss_equals_its_documents_run_separately(tiny_cohere2_teacher, student):
    teacher = tiny_cohere2_teacher
    docs = _docs(teacher.config.vocab_size, seed=1)
    row = _row(docs)
    # Per token: teacher and student logits of the packed row == those of each document alone.
    with torch.no_grad():
        mask = valid_positions(row["labels"])
        per_pos, n = chunked_divergence(teacher_logits(teacher, row["input_ids"], row["doc_ids"]),
                                        student(row["input_ids"], doc_ids=row["doc_ids"]).logits, mask, chunk=16)
        separate = []
        for d in docs:
            b = _alone(d)
            p, _ = chunked_divergence(teacher(input_ids=d).logits, student(d).logits, valid_positions(b["labels"]), chunk=16)
            separate.append(p)
    torch.testing.assert_close(per_pos, torch.cat(separate, 1), rtol=1e-4, atol=1e-6)
    assert int(n) == sum(n_ - 1 for n_ in LENGTHS)  # every position but each document's last
    # The stage-2 loss itself: its KL over the packed row is the token-weighted mean of the separate ones.
    loss_fn = make_kd_loss(teacher, kind="forward", temperature=1.0, chunk=16, w_kl=1.0, w_ce=0.0)
    with torch.no_grad():
        _, packed = loss_fn(student, row)
        parts = [loss_fn(student, _alone(d))[1]["kl"] for d in docs]
    weights = [n_ - 1 for n_ in LENGTHS]
    expected = sum(w * float(k) for w, k in zip(weights, parts)) / sum(weights)
    assert float(packed["kl"]) == pytest.approx(expected, rel=1e-4)
    # The old behaviour (no document ids, no block mask) gives another number: the test can tell them apart.
    with torch.no_grad():
        leaky, _ = chunked_divergence(teacher(input_ids=row["input_ids"]).logits, student(row["input_ids"]).logits,
                                      mask, chunk=16)
    assert (leaky.sum() / n - per_pos.sum() / n).abs() > 1e-3


def test_teacher_cache_keeps_packed_documents_apart(tiny_cohere2_teacher, student, tmp_path):
    from aetheris.losses import chunked_topk_divergence
    from aetheris.teacher_cache import CacheStream, load_heldout, write_cache

    teacher = tiny_cohere2_teacher
    V = teacher.config.vocab_size
    rows = [_row(_docs(V, seed=s)) for s in (2, 3)]

    class Rows:  # two packed rows, as PackedStream would give them
        i = 0

        def next_batch(self, n):
            out = rows[self.i:self.i + n]
            self.i += n
            return {key: torch.cat([r[key] for r in out]).numpy() for key in out[0]}

    heldout = {"en": rows[0]}
    folder = write_cache(teacher, Rows(), tmp_path / "cache", rows=2, k=V, dtype="float32", batch_size=2, heldout=heldout)
    batch = {key: torch.as_tensor(v) for key, v in CacheStream(folder).next_batch(2).items()}
    cached_held = load_heldout(folder)["en"]
    assert torch.equal(cached_held["doc_ids"], rows[0]["doc_ids"]) and torch.equal(cached_held["labels"], rows[0]["labels"])
    with torch.no_grad():
        s_logits = student(batch["input_ids"], doc_ids=batch["doc_ids"]).logits
        mask = valid_positions(batch["labels"])
        cached, _ = chunked_topk_divergence(batch["t_values"], batch["t_ids"], batch["t_tail"], s_logits, mask)
        for r, got in zip(rows, cached):
            a = LENGTHS[0]
            docs = [r["input_ids"][:, :a], r["input_ids"][:, a:]]
            expected = torch.cat([chunked_divergence(teacher(input_ids=d).logits, student(d).logits,
                                                     valid_positions(_alone(d)["labels"]))[0] for d in docs], 1)
            torch.testing.assert_close(got[None], expected, rtol=1e-4, atol=1e-5)


def test_a_teacher_that_cannot_keep_documents_apart_is_refused(tiny_cohere2_teacher, monkeypatch):
    import transformers.masking_utils as masking

    # Simulate a transformers whose mask builders ignore restarting positions (no packed-sequence support).
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(DocumentMaskError) as err:
        check_documents_kept_apart(tiny_cohere2_teacher)
    message = str(err.value)
    assert "\n" not in message and "data.pack=true" in message and "set data.pack=false" in message


def test_packed_stage2_run_refuses_a_leaking_teacher(tiny_cohere2_teacher, teacher_dir, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import transformers.masking_utils as masking

    from aetheris.checkpoint import save_model
    from aetheris.cli import main
    from aetheris.tokenizer import load_tokenizer

    init = tmp_path / "student"
    save_model(Aetheris(student_config(tiny_cohere2_teacher.config, n_pairs=2)), init, tokenizer=load_tokenizer(teacher_dir))
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    config = Path(__file__).resolve().parents[1] / "configs" / "nano-distill.yaml"
    args = ["distill", "--config", str(config), "--stages", "kl", f"teacher.name={teacher_dir}",
            f"run_dir={tmp_path / 'run'}", f"kl.init={init}", "data.languages=[en]",
            "data.sources=[{type: corpus, max_lines_per_language: 40}]", "data.seq_len=32", "kl.train.max_steps=1"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aetheris distill:")]
    assert len(err) == 1 and "does not keep packed documents apart" in err[0] and "set data.pack=false" in err[0]
    assert not (tmp_path / "run" / "kl").exists()  # refused before any training or writing


# ----------------------------------------------------------------------------------------------
# Padding


def _padded(x, pad):
    """x (1, T) -> the row right-padded by ``pad`` tokens, its attention mask and doc ids (padding its own doc)."""
    T = x.shape[1]
    ids = torch.cat([x, torch.zeros(1, pad, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, T), torch.zeros(1, pad)], 1).long()
    docs = torch.cat([torch.zeros(1, T), torch.ones(1, pad)], 1).long()
    return ids, mask, docs


@pytest.mark.parametrize("parallel", [False, True])
def test_padding_counts_in_neither_moe_balance_loss_nor_expert_load(parallel):
    torch.manual_seed(0)
    model = Aetheris(tiny_config(parallel_pairs=parallel)).double().eval()
    x = torch.randint(1, 101, (1, 23), generator=torch.Generator().manual_seed(3))
    ids, mask, docs = _padded(x, 17)
    ref = model(x)
    out = model(ids, attention_mask=mask, doc_ids=docs)
    torch.testing.assert_close(out.logits[:, :23], ref.logits)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    torch.testing.assert_close(out.expert_load, ref.expert_load)
    unmasked = model(ids, doc_ids=docs)  # what padding did before: it took part in both
    assert not torch.allclose(unmasked.aux_loss, ref.aux_loss)


def test_padding_counts_nowhere_in_the_stage1_mse(tiny_cohere2_teacher, student):
    from aetheris.teacher import hidden_states

    x = torch.randint(3, tiny_cohere2_teacher.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(4))
    ids, mask, _ = _padded(x, 13)
    for states, pad_mask in ((hidden_states(tiny_cohere2_teacher, x), None),
                             (hidden_states(tiny_cohere2_teacher, ids), mask.bool())):
        out, aux = pair_forward(student, 0, states[0], pad_mask=pad_mask)
        nmse = normalised_mse(out, states[2], states[0], pad_mask)
        if pad_mask is None:
            ref_nmse, ref_aux = nmse, aux
    torch.testing.assert_close(nmse, ref_nmse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(normalised_mse(out, states[2], states[0]), ref_nmse, rtol=1e-3)


def test_heldout_kl_counts_the_positions_the_labels_name(tiny_cohere2_teacher, student):
    teacher = tiny_cohere2_teacher
    docs = _docs(teacher.config.vocab_size, seed=5)
    row = _row(docs)
    ids, mask, _ = _padded(row["input_ids"], 9)
    labels = torch.cat([row["labels"], torch.full((1, 9), -100)], 1)
    doc_ids = torch.cat([row["doc_ids"], torch.full((1, 9), 2)], 1)
    got = heldout_kl(teacher, student, {"xx": {"input_ids": ids, "labels": labels, "doc_ids": doc_ids,
                                               "attention_mask": mask}}, chunk=16)
    separate = [heldout_kl(teacher, student, {"xx": _alone(d)}) for d in docs]
    # Each document's first token is never predicted, nor is the padding: n_doc - 1 positions per document.
    assert got["tokens"] == sum(s["tokens"] for s in separate) == sum(n - 1 for n in LENGTHS)
    expected = sum(s["mean"] * s["tokens"] for s in separate) / got["tokens"]
    assert got["mean"] == pytest.approx(expected, rel=1e-4)


def _packed_batch(vocab):
    """Two packed rows of two documents each, with per-token language ids (document 0: language 0, 1: 1)."""
    rows = [_row(_docs(vocab, seed=s)) for s in (6, 7)]
    batch = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
    batch["lang_ids"] = batch["doc_ids"].clone()
    return batch


@pytest.mark.parametrize("kind, temperature", [("forward", 1.0), ("forward", 2.0), ("reverse", 1.5), ("jsd", 1.0)])
def test_the_loss_that_trains_is_losses_distill_loss_on_packed_rows(tiny_cohere2_teacher, student, kind, temperature):
    teacher = tiny_cohere2_teacher
    batch = _packed_batch(teacher.config.vocab_size)
    loss_fn = make_kd_loss(teacher, kind=kind, temperature=temperature, chunk=16, w_kl=0.7, w_ce=0.3)
    with torch.no_grad():
        loss, metrics = loss_fn(student, batch)
        out = student(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"])
        t_logits = teacher_logits(teacher, batch["input_ids"], batch["doc_ids"])
        kd = distill_loss(t_logits, out.logits, batch["labels"], kind, temperature, chunk=64)  # another chunking
    torch.testing.assert_close(loss, 0.7 * kd + 0.3 * out.ce_loss + out.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["kl"], kd / temperature ** 2, rtol=1e-5, atol=1e-7)
    assert float(kd) > 1e-3


def test_the_cached_loss_that_trains_is_losses_cached_distill_loss(tiny_cohere2_teacher, student):
    teacher = tiny_cohere2_teacher
    batch = _packed_batch(teacher.config.vocab_size)
    with torch.no_grad():
        t_values, t_ids, t_tail = topk_teacher(teacher_logits(teacher, batch["input_ids"], batch["doc_ids"]), k=8,
                                               temperature=2.0)  # what a top-8 cache stores
        cached = {**batch, "t_values": t_values, "t_ids": t_ids, "t_tail": t_tail}
        loss, metrics = make_kd_loss(None, kind="forward", temperature=2.0, chunk=16, w_kl=1.0, w_ce=0.0)(student, cached)
        out = student(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"])
        kd = cached_distill_loss(t_values, t_ids, t_tail, out.logits, batch["labels"], temperature=2.0)
    torch.testing.assert_close(loss, kd + out.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["kl"], kd / 4.0, rtol=1e-5, atol=1e-7)


def test_the_dro_loss_is_the_q_weighted_mean_of_per_family_distill_losses(tiny_cohere2_teacher, student):
    teacher = tiny_cohere2_teacher
    batch = _packed_batch(teacher.config.vocab_size)
    dro = FamilyDRO(["a", "b"], step=0.1)
    dro.q = torch.tensor([0.3, 0.7])
    loss_fn = make_kd_loss(teacher, kind="forward", temperature=1.0, chunk=16, w_kl=1.0, w_ce=0.0,
                           lang_family=torch.tensor([0, 1]), dro=dro)
    with torch.no_grad():
        loss, metrics = loss_fn(student, batch)
        out = student(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"])
        t_logits = teacher_logits(teacher, batch["input_ids"], batch["doc_ids"])
        per_family = []
        for f in (0, 1):  # family f's positions only: every other position's next label hidden
            labels = batch["labels"].clone()
            labels[:, 1:][batch["lang_ids"][:, :-1] != f] = -100
            per_family.append(distill_loss(t_logits, out.logits, labels))
    expected = 0.3 * per_family[0] + 0.7 * per_family[1]
    torch.testing.assert_close(loss, expected + out.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["family_kl_sum"] / metrics["family_tokens"], torch.stack(per_family),
                               rtol=1e-5, atol=1e-7)
    assert abs(float(per_family[0] - per_family[1])) > 1e-4  # the weights matter
