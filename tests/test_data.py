"""Data layer: the 70-language corpus, held-out split, temperature sampling, packing, bad input, bounded input
(an over-long record is skipped in bounded memory; validation tokenizes only what its rows need; binary or mostly
malformed files are errors naming the file)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from aetheris.data import (
    IGNORE_INDEX,
    PackedStream,
    language_weights,
    split_heldout,
    tokenize_documents,
    tokenize_until,
    validation_rows,
)
from aetheris.sources import Document, MalformedLog, load_documents, offline_corpus_documents
from aetheris.languages import CODES


@pytest.fixture(scope="module")
def corpus():
    return offline_corpus_documents(max_lines_per_language=200)


def test_offline_corpus_covers_all_70_languages(corpus):
    assert {d.lang for d in corpus} == set(CODES)
    assert all(d.text.strip() and "\ufffd" not in d.text for d in corpus)


def test_heldout_split_holds_out_parallel_documents_in_every_language(corpus):
    train, val = split_heldout(corpus, val_fraction=0.2, seed=0)
    assert set(train) == set(val) == set(CODES)
    ntrex_val = {d.doc_id for lang in val for d in val[lang] if d.doc_id.startswith("bbc") or "." in d.doc_id}
    for lang in CODES:
        train_ids = {d.doc_id for d in train[lang]}
        assert not train_ids & {d.doc_id for d in val[lang]}
        assert not train_ids & ntrex_val  # no translation of a validation document is trained on
    again = split_heldout(corpus, val_fraction=0.2, seed=0)
    assert again == (train, val)


def test_language_weights_go_from_proportional_to_uniform():
    sizes = {"en": 900, "sw": 100}
    assert language_weights(sizes, 1.0) == pytest.approx({"en": 0.9, "sw": 0.1})
    assert language_weights(sizes, math.inf) == pytest.approx({"en": 0.5, "sw": 0.5})
    mid = language_weights(sizes, 3.0)
    assert 0.5 < mid["en"] < 0.9
    with pytest.raises(ValueError, match="temperature"):
        language_weights(sizes, 0.0)


def _docs(n_langs=3, n_docs=7, seed=0):
    rng = np.random.default_rng(seed)
    docs = {}
    for li in range(n_langs):
        docs[f"l{li}"] = [[1, *rng.integers(10, 100, size=int(rng.integers(3, 40))).tolist(), 2] for _ in range(n_docs)]
    return docs


def test_packed_rows_are_the_documents_with_boundaries():
    docs = _docs()
    stream = PackedStream(docs, seq_len=32, language_temperature=1.0, seed=1)
    batch = stream.next_batch(20)
    ids, labels, doc_ids = batch["input_ids"], batch["labels"], batch["doc_ids"]
    all_docs = {tuple(d) for lang in docs.values() for d in lang}
    for r in range(len(ids)):
        # Split the row at doc_id changes: every piece is a whole document or a piece of one.
        cuts = [0, *np.flatnonzero(np.diff(doc_ids[r])) + 1, len(ids[r])]
        for a, b in zip(cuts[:-1], cuts[1:]):
            piece = tuple(ids[r][a:b])
            assert any(_contains(d, piece) for d in all_docs)
            if piece[0] == 1:  # a document start: its BOS is given, not predicted
                assert labels[r][a] == IGNORE_INDEX
            assert (labels[r][a + 1:b] == ids[r][a + 1:b]).all()


def _contains(doc, piece):
    n = len(piece)
    return any(doc[i:i + n] == piece for i in range(len(doc) - n + 1))


def test_stream_covers_each_language_once_per_epoch():
    docs = _docs(n_langs=1, n_docs=5)
    stream = PackedStream(docs, seq_len=8, pack=False)
    starts = [tuple(stream.next_row()["input_ids"][:3]) for _ in range(10)]
    first, second = sorted(starts[:5]), sorted(starts[5:])
    assert first == second == sorted(tuple(d[:3]) for d in docs["l0"])


def test_unpacked_rows_pad_with_ignored_labels():
    docs = {"x": [[1, 5, 6, 2]]}
    row = PackedStream(docs, seq_len=8, pack=False, pad_id=0).next_row()
    assert row["input_ids"].tolist() == [1, 5, 6, 2, 0, 0, 0, 0]
    assert row["labels"].tolist() == [IGNORE_INDEX, 5, 6, 2] + [IGNORE_INDEX] * 4
    assert row["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_stream_state_round_trips_through_json():
    docs = _docs()
    a = PackedStream(docs, seq_len=16, language_temperature=2.0, seed=3)
    a.next_batch(7)
    state = json.loads(json.dumps(a.state_dict()))
    expected = a.next_batch(9)
    b = PackedStream(docs, seq_len=16, language_temperature=2.0, seed=3)
    b.load_state_dict(state)
    got = b.next_batch(9)
    for k in expected:
        assert (expected[k] == got[k]).all()
    other = PackedStream(_docs(n_docs=6), seq_len=16)
    with pytest.raises(ValueError, match="different dataset"):
        other.load_state_dict(state)


def test_sampling_frequencies_follow_the_temperature():
    docs = {"big": [[1, 3, 2]] * 90, "small": [[1, 4, 2]] * 10}
    for temperature in (1.0, math.inf):
        stream = PackedStream(docs, seq_len=3, language_temperature=temperature, seed=0, pack=False)
        langs = [stream.languages[stream.next_row()["lang_ids"][0]] for _ in range(4000)]
        share = langs.count("small") / len(langs)
        expected = language_weights({"big": 270, "small": 30}, temperature)["small"]
        assert share == pytest.approx(expected, abs=0.025)


def test_validation_rows_are_deterministic_and_per_language(tiny_tokenizer, corpus):
    _, val = split_heldout([d for d in corpus if d.lang in ("en", "th")], 0.2)
    ids = {lang: tokenize_documents(d, tiny_tokenizer) for lang, d in val.items()}
    a, b = validation_rows(ids, 32, 3), validation_rows(ids, 32, 3)
    assert set(a) == {"en", "th"} and a["en"]["input_ids"].shape == (3, 32)
    assert all((a[lang][k] == b[lang][k]).all() for lang in a for k in a[lang])


def test_tokenized_documents_are_bos_text_eos(tiny_tokenizer):
    (ids,) = tokenize_documents([Document("Habari ya leo", "sw", "x")], tiny_tokenizer)
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[1:-1]) == "Habari ya leo"


# --- bad input ---------------------------------------------------------------------------------


def test_jsonl_malformed_records_are_counted_and_skipped(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_bytes(
        b'{"text": "good one", "lang": "sw"}\n'
        b'{"text": null, "lang": "sw"}\n'
        b'{"lang": "sw"}\n'
        b'{not json\n'
        b'{"text": "bad \xff\xfe bytes", "lang": "sw"}\n'
        b'{"text": "unknown language", "lang": "xx"}\n'
        b'{"text": "   ", "lang": "sw"}\n'
        b'{"text": "good two", "lang": "en"}\n'
        + b"".join(b'{"text": "more %d", "lang": "en"}\n' % i for i in range(5))  # malformed: a minority
    )
    log = MalformedLog()
    docs = load_documents([{"type": "jsonl", "path": str(path)}], "all", log)
    assert [(d.text, d.lang) for d in docs][:2] == [("good one", "sw"), ("good two", "en")] and len(docs) == 7
    assert log.total == 6
    summary = log.summary()
    for reason in ("record without text", "invalid JSON", "not valid UTF-8", "'xx' not in the registry", "empty text"):
        assert reason in summary
    assert f"{path}:4" in summary  # names the file and line


def test_text_file_with_a_bad_line(tmp_path):
    path = tmp_path / "sw.txt"
    path.write_bytes("Habari\n\xff\nNzuri sana\n".encode("latin-1"))
    log = MalformedLog()
    docs = load_documents([{"type": "text", "path": str(path), "language": "sw"}], ["sw"], log)
    assert [d.text for d in docs] == ["Habari", "Nzuri sana"]
    assert log.counts["not valid UTF-8"] == 1 and f"{path}:2" in log.summary()


def test_parquet_goes_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["Bonjour", None, "Hallo"], "language": ["fr", "fr", "de"]}), path)
    log = MalformedLog()
    docs = load_documents([{"type": "parquet", "path": str(path), "text_field": "content", "language_field": "language"}], "all", log)
    assert [(d.text, d.lang) for d in docs] == [("Bonjour", "fr"), ("Hallo", "de")]
    assert log.counts["record without text"] == 1


def test_bad_sources_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_documents([{"type": "text", "path": str(tmp_path / "nope.txt"), "language": "sw"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="gave no usable documents"):
        load_documents([{"type": "jsonl", "path": str(empty)}])
    with pytest.raises(ValueError, match="unknown language code 'klingon'"):
        load_documents([{"type": "text", "path": str(empty), "language": "klingon"}])
    with pytest.raises(ValueError, match="data.languages.*unknown language code 'qq'"):
        load_documents([{"type": "corpus"}], ["en", "qq"])
    with pytest.raises(ValueError, match="needs a type"):
        load_documents([{"path": "x"}])
    with pytest.raises(ValueError, match=r"unknown config key 'data.sources\[0\].txt_field'; did you mean "
                                         r"'data.sources\[0\].text_field'\?"):
        load_documents([{"type": "jsonl", "path": str(empty), "txt_field": "t"}])
    with pytest.raises(ValueError, match="needs a fixed `language:`"):
        load_documents([{"type": "text", "path": str(empty)}])
    monkeypatch.delenv("AETHERIS_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="AETHERIS_DATA_DIR is not set"):
        load_documents([{"type": "corpus"}])


# --- bounded input ------------------------------------------------------------------------------


def test_an_over_long_record_is_skipped_with_file_line_in_bounded_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "before", "lang": "sw"}\n')
        f.write('{"text": "' + "x" * 20_000_000 + '", "lang": "sw"}\n')  # one 20 MB line
        f.write('{"text": "after", "lang": "sw"}\n')
    (tmp_path / "flat.txt").write_text("y" * 5_000_000)  # a text file with no newline at all
    (tmp_path / "ok.txt").write_text("karibu\n")
    log = MalformedLog()
    tracemalloc.start()
    docs = load_documents([{"type": "jsonl", "path": str(path)},
                           {"type": "text", "path": str(tmp_path / "*.txt"), "language": "sw"}], ["sw"], log, max_chars=100_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [d.text for d in docs] == ["before", "after", "karibu"]
    assert log.counts["document longer than data.max_document_chars (raise it to keep such documents)"] == 2
    assert f"{path}:2" in log.summary() and f"{tmp_path / 'flat.txt'}:1" in log.summary()
    assert peak < 4_000_000  # never the 20 MB line: reading is bounded by max_chars (x4 bytes) + 1 MiB chunks


def test_validation_tokenizes_only_until_its_rows_are_filled(tiny_tokenizer, corpus):
    lines = [line for d in corpus if d.lang == "sw" for line in d.text.split("\n")]
    docs = [Document(line, "sw", str(i)) for i, line in enumerate(lines[:150])]
    seen = []

    class Counting:  # the real tokenizer, counting the documents it is asked to encode
        bos_token_id, eos_token_id = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id

        def __call__(self, texts, **kw):
            seen.extend(texts)
            return tiny_tokenizer(texts, **kw)

    seq_len, rows = 32, 3
    lazy = validation_rows({"sw": tokenize_until(docs, Counting(), rows * seq_len)}, seq_len, rows)
    eager = validation_rows({"sw": tokenize_documents(docs, tiny_tokenizer)}, seq_len, rows)
    for key in eager["sw"]:
        np.testing.assert_array_equal(lazy["sw"][key], eager["sw"][key])
    assert len(seen) <= 16 < len(docs)  # one batch of 16 documents filled 3 rows of 32 tokens
    assert len(tokenize_until(docs, tiny_tokenizer, None)) == len(docs)


def test_a_binary_or_mostly_malformed_file_is_an_error_naming_it(tmp_path):
    rng = np.random.default_rng(0)
    binary = tmp_path / "model.bin"
    binary.write_bytes(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=f"{binary} holds NUL bytes: it is a binary file"):
        load_documents([{"type": "text", "path": str(binary), "language": "en"}], ["en"])
    latin1 = tmp_path / "latin1.txt"  # no NUL, but not UTF-8: most lines fail to decode
    latin1.write_bytes("\n".join(f"caf\xe9 cr\xe8me {i}" for i in range(20)).encode("latin-1") + b"\nplain ascii\n")
    with pytest.raises(ValueError, match=f"{latin1}: 20 of its 21 records are malformed \\(not valid UTF-8\\)"):
        load_documents([{"type": "text", "path": str(latin1), "language": "fr"}], ["fr"])
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"text": "fine", "lang": "en"}\n' + "not json\n" * 3)
    with pytest.raises(ValueError, match=f"{garbage}: 3 of its 4 records are malformed"):
        load_documents([{"type": "jsonl", "path": str(garbage)}], ["en"])


def test_hub_source_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="point the config at local files"):
        load_documents([{"type": "hub", "name": "aetheris-test/does-not-exist", "language": "sw"}], ["sw"])


def test_streaming_sources_resume_exactly_and_hold_out_documents(tmp_path, tiny_tokenizer):
    from aetheris.data import StreamingDocs, is_heldout

    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"hati namba {i} " * (1 + i % 5), "lang": "sw" if i % 3 else "en", "id": i}) for i in range(300)]
    path.write_text("\n".join(lines) + "\n")
    src = [{"type": "jsonl", "path": str(path), "id_field": "id"}]

    def make():
        docs = {lang: StreamingDocs(src, lang, tiny_tokenizer, 0.1, 0, MalformedLog()) for lang in ("en", "sw")}
        return PackedStream(docs, seq_len=24, seed=0), docs

    a, docs = make()
    a.next_batch(30)  # more than one pass over the English documents
    state = json.loads(json.dumps(a.state_dict()))
    expected = a.next_batch(10)
    b, _ = make()
    b.load_state_dict(state)
    got = b.next_batch(10)
    assert all((expected[k] == got[k]).all() for k in expected)
    held = docs["sw"].heldout(max_docs=100)
    assert held and all(is_heldout(d.doc_id, 0.1, 0) for d in held)


# --- the one language sampler -------------------------------------------------------------------


def test_language_sampler_follows_its_reference_walk():
    # The contract a checkpoint's data position relies on: a language by rng.choice(p), then that language's
    # next item in the permutation seeded by (seed, language index, epoch).
    from aetheris.data import LanguageSampler

    counts = {"sw": 3, "en": 5, "yo": 2}
    sampler = LanguageSampler(counts, counts, language_temperature=2.0, seed=7)
    languages = sorted(counts)
    weights = language_weights(counts, 2.0)
    probs = np.array([weights[lang] for lang in languages])
    rng, cursor, epoch = np.random.default_rng(7), dict.fromkeys(languages, 0), dict.fromkeys(languages, 0)
    for _ in range(60):
        li = int(rng.choice(len(languages), p=probs))
        lang = languages[li]
        expected = int(np.random.default_rng([7, li, epoch[lang]]).permutation(counts[lang])[cursor[lang]])
        cursor[lang] += 1
        if cursor[lang] == counts[lang]:
            cursor[lang], epoch[lang] = 0, epoch[lang] + 1
        assert sampler.next() == (li, expected)


def test_packed_and_sft_streams_draw_through_the_same_sampler():
    from aetheris.sft import SFTStream

    # Equal-length items, so token weights (packed) and item counts (SFT) give the same probabilities.
    docs = {lang: [[1, 100 * li + j, 2] for j in range(n)] for li, (lang, n) in enumerate([("en", 4), ("sw", 2), ("yo", 3)])}
    packed = PackedStream(docs, seq_len=3, language_temperature=3.0, seed=5, pack=False)
    sft = SFTStream({lang: [(d, d) for d in ds] for lang, ds in docs.items()}, 3, language_temperature=3.0, seed=5)
    a, b = packed.next_batch(40), sft.next_batch(40)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["lang_ids"], b["lang_ids"])


def test_language_weights_can_be_set_and_are_checked():
    docs = {"big": [[1, 3, 2]] * 9, "small": [[1, 4, 2]]}
    stream = PackedStream(docs, seq_len=3, seed=0, pack=False)
    stream.set_language_weights({"big": 0.0, "small": 2.0})
    assert stream.probs.tolist() == [0.0, 1.0]
    assert {int(stream.next_row()["lang_ids"][0]) for _ in range(20)} == {stream.languages.index("small")}
    stream.set_language_weights([3.0, 1.0])  # in `languages` order
    assert stream.probs.tolist() == [0.75, 0.25]
    for bad in ({"big": 1.0}, {"big": -1.0, "small": 1.0}, [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="language weights"):
            stream.set_language_weights(bad)
