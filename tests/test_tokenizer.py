"""The trained BPE: byte-level round trips in every script, Cohere special tokens, save/load, offline errors."""

from __future__ import annotations

import pytest

from aetheris.tokenizer import COHERE_SPECIAL_TOKENS, load_tokenizer, train_bpe_tokenizer

SAMPLES = ["Habari ya dunia", "你好，世界", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Привет, мир", "مرحبا بالعالم", "ሰላም ልዑል", "emoji 🙂 ok"]


def test_round_trip_every_script(tiny_tokenizer):
    for text in SAMPLES:
        ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
        assert tiny_tokenizer.decode(ids) == text  # byte-level: nothing is unknown, nothing is lost


def test_special_tokens_are_single_ids_and_bos_is_prepended(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for special in COHERE_SPECIAL_TOKENS:
        ids = tok(special, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] == tok.convert_tokens_to_ids(special)
    ids = tok("hello").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "hello"


def test_chat_template_is_the_projects_one(tiny_tokenizer):
    from aetheris.chat import render_messages

    messages = [{"role": "user", "content": "Jambo"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_messages(messages)
    assert text == "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Jambo<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"


def test_save_and_load_gives_the_same_encoding(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    for text in SAMPLES + ["<|START_ACTION|>[]<|END_ACTION|>"]:
        assert again(text).input_ids == tiny_tokenizer(text).input_ids
    assert again.chat_template == tiny_tokenizer.chat_template


def test_training_is_deterministic():
    texts = ["abc abd abe", "xyz xyw", "Mambo vipi rafiki"] * 20
    a, b = train_bpe_tokenizer(texts, 300), train_bpe_tokenizer(texts, 300)
    assert a.get_vocab() == b.get_vocab()


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(["a"], vocab_size=100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer([], vocab_size=512)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_offline_hub_name_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_tokenizer("CohereLabs/tiny-aya-base-not-cached")


def test_isolated_spaces_make_a_word_the_same_tokens_after_a_space_and_after_a_quote(tmp_path):
    texts = [f"What time is it in {c}? {{\"city\": \"{c}\"}}" for c in ("Berlin", "Москва", "Nairobi", "東京")] * 30 + SAMPLES
    usual, isolated = train_bpe_tokenizer(texts, 400), train_bpe_tokenizer(texts, 400, isolate_spaces=True)
    isolated.save_pretrained(tmp_path)
    isolated = load_tokenizer(tmp_path)  # the pre-tokenizer survives a save

    def ids(tok, text):
        return tok(text, add_special_tokens=False).input_ids

    for word in ("Berlin", "Москва", "Kampala"):
        assert ids(isolated, f" {word}") == ids(isolated, " ") + ids(isolated, word)
        assert ids(isolated, f'"{word}') == ids(isolated, '"') + ids(isolated, word)
        if word != "Kampala":  # a word the usual BPE learned: "ĠBerlin", not "Ġ" "Berlin"
            assert ids(usual, f" {word}") != ids(usual, " ") + ids(usual, word)
    for text in SAMPLES + ["two  spaces\n\n tab\tend ", '{"city": "Nairobi"}']:
        assert isolated.decode(ids(isolated, text)) == text
