"""Parallel-text perplexity for all 70 languages: bits per byte, and per-token KL(teacher || student).

Text: NTREX-128 (Federmann et al. 2022; newstest2019 translated into 128 languages, 1,997 sentences)
for 68 languages, NusaX-MT test (Winata et al. 2023) for Javanese, MAFAND-MT test (Adelani et al. 2022)
for Nigerian Pidgin. The same sentences (NTREX is parallel) in every language, so differences between
languages are the model's, not the content's.

Bits per byte (tokenizer-independent, so teacher and student with different vocabularies compare):
each sentence is scored as ``[prefix] + encode(sentence)`` where prefix is the tokenizer's BOS (EOS if
it has none) and every sentence token is predicted; ``bpb = sum(-log2 p) / sum(UTF-8 bytes)`` over the
language's sentences (``Scores`` with values = bits, weights = bytes, so the bootstrap resamples
sentences).

Which sentences: the first ``ppl_max_sentences`` from index ``ppl_start`` (default 0). Models trained on
the offline corpus read its *first* lines (``data`` sources ``max_lines_per_language``), so a run that
trained on them evaluates from a later index (the demo: ``ppl_start`` past its training lines) to keep
training text out of the score. The jv (NusaX test) and pcm (MAFAND test) files are shorter (400 and
1,564 sentences); NTREX has 1,997.

KL (only when ``--teacher`` is given, and only when both tokenizers are the same): per token
``sum_v p_T(v) (log p_T(v) - log p_S(v))`` in nats, averaged over every predicted token of the
language; result name ``kl``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from aetheris.languages import CODES
from aetheris.paths import data_path
from aetheris.tasks import Scores

NAME = "ppl"


def languages(options: dict) -> list[str]:
    return list(CODES)


def _ntrex_map() -> dict[str, str]:
    path = data_path("corpus", "ntrex128", "tiny_aya_iso1_to_ntrex.tsv", what="NTREX-128 language map")
    with open(path, encoding="utf-8") as f:
        return {row[0]: row[2] for row in csv.reader(f, delimiter="\t") if len(row) >= 3}


def data_files(lang: str, options: dict) -> list[Path]:
    if lang == "jv":
        return [data_path("corpus", "nusax_mt", "test.csv", what="NusaX-MT (Javanese) test set")]
    if lang == "pcm":
        return [data_path("corpus", "mafand_en_pcm", "test.pcm", what="MAFAND-MT Nigerian Pidgin test set")]
    mapping = _ntrex_map()
    if lang not in mapping:
        raise FileNotFoundError(f"no NTREX-128 file is mapped for {lang!r} in tiny_aya_iso1_to_ntrex.tsv")
    return [data_path("corpus", "ntrex128", mapping[lang], what=f"NTREX-128 {lang} reference")]


def load(lang: str) -> list[str]:
    (path,) = data_files(lang, {})
    if lang == "jv":
        with open(path, encoding="utf-8", newline="") as f:
            lines = [row["javanese"] for row in csv.DictReader(f)]
    else:
        lines = path.read_text(encoding="utf-8").split("\n")
    return [line.strip() for line in lines if line.strip()]


def check_same_tokenizer(teacher, student) -> None:
    """KL compares distributions token by token: both models must share one vocabulary."""
    tv, sv = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if tv != sv:
        raise ValueError(
            f"per-token KL needs one tokenizer, but the teacher has {len(tv)} tokens and the student {len(sv)}"
            f"{' (same size, different ids)' if len(tv) == len(sv) else ''}. Drop --teacher (bits per byte "
            "compares across tokenizers), or evaluate a student distilled with the teacher's tokenizer."
        )


def _sequences(lm, sentences: list[str]) -> list[list[int]]:
    return [[lm.prefix_id] + lm.encode(s, special=False) for s in sentences]


def kl_per_sequence(teacher, student, id_lists: list[list[int]]) -> list[tuple[float, int]]:
    """(sum over predicted tokens of KL(p_T || p_S) in nats, number of predicted tokens) per sequence."""
    import torch

    out: list = [None] * len(id_lists)
    order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))
    bs = student.batch_size
    for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        batch = [id_lists[i][: student.max_length] for i in idx]
        t_logits = teacher._logits(batch).to(student.device)
        s_logits = student._logits(batch)
        for row, i in enumerate(idx):
            n = len(batch[row]) - 1
            t = torch.log_softmax(t_logits[row, :n], dim=-1)
            s = torch.log_softmax(s_logits[row, :n], dim=-1)
            kl = (t.exp() * (t - s)).sum(-1)  # (n,)
            out[i] = (float(kl.sum()), n)
    return out


def run(lm, lang: str, options: dict, limit: int | None = None) -> dict[str, Scores]:
    sentences = load(lang)
    start = int(options.get("ppl_start") or 0)
    if not 0 <= start < len(sentences):
        raise ValueError(f"--ppl-start {start} leaves no {lang} sentence to score ({len(sentences)} in the file); "
                         f"choose a value below {len(sentences)}")
    cap = min(x for x in (limit, options.get("ppl_max_sentences"), len(sentences) - start) if x is not None)
    ids = list(range(start, start + cap))  # sentence indices: parallel across languages, stable across runs
    sentences = sentences[start:start + cap]
    seqs = _sequences(lm, sentences)
    logprobs = lm.token_logprobs(seqs, desc=f"ppl {lang}")
    bits = [-sum(lp) / math.log(2) for lp in logprobs]
    nbytes = [len(s.encode("utf-8")) for s in sentences]
    tokens = sum(len(s) - 1 for s in seqs)
    results = {"ppl": Scores("bits_per_byte", False, ids, bits, nbytes,
                             extra={"tokens_per_byte": tokens / sum(nbytes)})}
    teacher = options.get("teacher")
    if teacher is not None:
        kl = kl_per_sequence(teacher, lm, seqs)
        results["kl"] = Scores("kl_teacher_student_nats_per_token", False, ids,
                               [k for k, _ in kl], [float(n) for _, n in kl])
    return results
