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

Which sentences (no training text is scored):
- ``ppl_split="heldout"`` (the default): only sentences of documents that training holds out -- the
  same document ids and the same rule as ``aetheris.data.split_heldout`` (``hash(seed, doc_id) <
  val_fraction``; NTREX documents from ``DOCUMENT_IDS.tsv``, NusaX rows ``nusax:test:<row>``, MAFAND
  blocks ``mafand:test:<block>``), with ``ppl_seed``/``ppl_val_fraction`` = the training run's ``seed``
  and ``val_fraction`` (read from the checkpoint when it records them, else the training defaults 0 and
  0.05), minus any sentence that also occurs in a training document of the corpus (NTREX repeats a
  few sentences across documents); ``ppl_split="all"`` scores every sentence (for models that never saw this corpus, or trained
  only on its first lines: the demo);
- then those with index >= ``ppl_start``, at most ``ppl_max_sentences`` (and ``--limit``) of them;
- when the checkpoint records its training data (``state.json`` beside a training checkpoint's
  ``model/`` folder: sources, languages, seed, val_fraction), the run's training documents are rebuilt
  and a scored sentence that occurs in them stops the run with the file, line and sentence named.
Example ids are sentence indices in the file (parallel across NTREX languages). The jv (NusaX test)
and pcm (MAFAND test) files are shorter (400 and 1,564 sentences); NTREX has 1,997.

KL (only when ``--teacher`` is given, and only when both tokenizers are the same): per token
``sum_v p_T(v) (log p_T(v) - log p_S(v))`` in nats, averaged over every predicted token of the
language; result name ``kl``.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import torch

from aetheris.data import is_heldout, split_heldout
from aetheris.languages import CODES
from aetheris.losses import teacher_divergence
from aetheris.paths import data_path
from aetheris.sources import PCM_BLOCK_LINES, load_documents
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


def load_with_ids(lang: str) -> list[tuple[str, str]]:
    """(training document id, sentence) per non-empty sentence of the language's file, in file order.
    The ids are the ones ``aetheris.data.offline_corpus_documents`` gives the same lines in training."""
    (path,) = data_files(lang, {})
    if lang == "jv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = [(f"nusax:test:{row['']}", row["javanese"]) for row in csv.DictReader(f)]
    elif lang == "pcm":
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [(f"mafand:test:{i // PCM_BLOCK_LINES}", line) for i, line in enumerate(lines)]
    else:
        ids_path = data_path("corpus", "ntrex128", "DOCUMENT_IDS.tsv", what="NTREX-128 document ids")
        doc_ids = [line.split("\t")[0].strip() for line in ids_path.read_text(encoding="utf-8").splitlines()]
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) != len(doc_ids):
            raise ValueError(f"{path}: {len(lines)} lines but {ids_path} has {len(doc_ids)}; the two must be line-aligned")
        rows = list(zip(doc_ids, lines))
    return [(doc_id, text.strip()) for doc_id, text in rows if text.strip()]


def load(lang: str) -> list[str]:
    return [text for _, text in load_with_ids(lang)]


def recorded_training(model_path: str | Path) -> dict | None:
    """The training data a checkpoint records: ``state.json`` in the model folder or beside it (a
    training checkpoint is ``step-N/{model/, state.json}``) -> {file, sources, languages, seed,
    val_fraction}; None when nothing is recorded."""
    folder = Path(model_path)
    for candidate in (folder / "state.json", folder.parent / "state.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text(encoding="utf-8")).get("config") or {}
            except (json.JSONDecodeError, AttributeError) as err:
                raise ValueError(f"{candidate} is not a training state file ({err}); "
                                 "move it away or re-save the checkpoint") from None
            data, train = config.get("data") or {}, config.get("train") or {}
            if "sources" in data:
                return {"file": str(candidate), "sources": data["sources"], "languages": data.get("languages", "all"),
                        "seed": int(train.get("seed", 0)), "val_fraction": float(data.get("val_fraction", 0.05))}
    return None


@functools.lru_cache(maxsize=8)
def _training_lines(recorded_json: str) -> dict[str, frozenset]:
    """Language -> every line of the recorded run's training documents (its split rebuilt exactly)."""
    rec = json.loads(recorded_json)
    try:
        docs = load_documents(rec["sources"], rec["languages"])
    except (OSError, ValueError) as err:
        raise ValueError(f"{rec['file']}: cannot rebuild the recorded training data to check it against the scored "
                         f"sentences ({err})") from None
    train, _ = split_heldout(docs, rec["val_fraction"], seed=rec["seed"])
    return {lang: frozenset(line.strip() for d in ds for line in d.text.split("\n")) for lang, ds in train.items()}


def select(lang: str, options: dict, limit: int | None = None) -> tuple[list[int], list[str]]:
    """(sentence indices, sentences) the task scores for ``lang`` under ``options`` (see the docstring)."""
    rows = load_with_ids(lang)
    split = options.get("ppl_split") or "heldout"
    if split not in ("heldout", "all"):
        raise ValueError(f"--ppl-split {split!r}: choose heldout (only documents training holds out) or all")
    start = int(options.get("ppl_start") or 0)
    if not 0 <= start < len(rows):
        raise ValueError(f"--ppl-start {start} leaves no {lang} sentence to score ({len(rows)} in the file); "
                         f"choose a value below {len(rows)}")
    seed, fraction = int(options.get("ppl_seed") or 0), float(options.get("ppl_val_fraction") or 0.05)
    if split == "heldout":
        # A held-out document can repeat a sentence of a training document (NTREX sr has one): the
        # corpus's training side is rebuilt with the same split and its lines are excluded too.
        corpus = {"file": "the offline corpus", "sources": [{"type": "corpus"}], "languages": [lang], "seed": seed,
                  "val_fraction": fraction}
        trained = _training_lines(json.dumps(corpus, sort_keys=True)).get(lang, frozenset())
    chosen = [i for i, (doc_id, text) in enumerate(rows)
              if i >= start and (split == "all" or (is_heldout(doc_id, fraction, seed) and text not in trained))]
    cap = min(x for x in (limit, options.get("ppl_max_sentences"), len(chosen)) if x is not None)
    chosen = chosen[:cap]
    if not chosen:
        raise ValueError(f"no {lang} sentence is held out by seed {seed}, val_fraction {fraction} from sentence {start} on; "
                         "lower --ppl-start, or pass --ppl-split all for a model that never trained on this corpus")
    recorded = options.get("ppl_training")
    if recorded:
        seen = _training_lines(json.dumps(recorded, sort_keys=True)).get(lang, frozenset())
        leaked = next((i for i in chosen if rows[i][1] in seen), None)
        if leaked is not None:
            (path,) = data_files(lang, {})
            raise ValueError(
                f"{path}: sentence {leaked} ({rows[leaked][1][:60]!r}) is in the training data recorded in "
                f"{recorded['file']} (seed {recorded['seed']}, val_fraction {recorded['val_fraction']}); scoring it "
                "would measure memorisation. Use --ppl-split heldout with that seed and val_fraction (the default "
                "for this checkpoint), or score a model that did not train on this text.")
    return chosen, [rows[i][1] for i in chosen]


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
    """(sum over predicted tokens of KL(p_T || p_S) in nats, number of predicted tokens) per sequence: the
    per-token KL of ``losses.teacher_divergence``, the one the distillation stages train on and report."""
    out: list = [None] * len(id_lists)
    order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))
    bs = student.batch_size
    for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        batch = [id_lists[i][: student.max_length] for i in idx]
        t_logits = teacher.logits(batch).to(student.device)
        s_logits = student.logits(batch)
        predicted = torch.tensor([len(r) - 1 for r in batch], device=s_logits.device)
        mask = torch.arange(s_logits.shape[1], device=s_logits.device)[None] < predicted[:, None]  # (B, T), no padding
        per_pos, _ = teacher_divergence(t_logits, s_logits, mask)                                  # (B, T)
        for row, i in enumerate(idx):
            n = len(batch[row]) - 1
            out[i] = (float(per_pos[row, :n].sum()), n)
    return out


def run(lm, lang: str, options: dict, limit: int | None = None) -> dict[str, Scores]:
    ids, sentences = select(lang, options, limit)  # sentence indices: parallel across languages, stable across runs
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
