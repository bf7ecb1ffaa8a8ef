"""Generation and checkpoints: greedy == argmax of the full forward, batching, sampling, stops,
UTF-8-safe streaming, HF interop, and clear errors for bad prompts and broken checkpoints."""

import json

import pytest
import torch
import transformers

from conftest import tiny_config
import aetheris  # noqa: F401  (registers the Auto classes)
from aetheris.checkpoint import load_model, save_model
from aetheris.generation import Detokenizer, SamplingParams, decode_ids, generate, sample, stream
from aetheris.model import Aetheris


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(tiny_tokenizer), max_seq_len=64)
    return Aetheris(cfg).eval()


def test_greedy_generation_is_the_argmax_of_the_full_forward(model):
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    new = decode_ids(model, prompt, max_new_tokens=12)[0]
    seq = prompt[0].tolist()
    for token in new:  # re-run the whole sequence each time: the slow, obviously-right way
        assert token == model(torch.tensor([seq])).logits[0, -1].argmax().item()
        seq.append(token)
    assert decode_ids(model, prompt, max_new_tokens=12)[0] == new  # deterministic


def test_batched_left_padded_generation_equals_one_at_a_time(model, tiny_tokenizer):
    prompts = ["Hello world, this is a longer prompt", "สวัสดี", "ሰላም ለዓለም"]
    batch = generate(model, tiny_tokenizer, prompts, max_new_tokens=10)
    for prompt, result in zip(prompts, batch):
        alone = generate(model, tiny_tokenizer, prompt, max_new_tokens=10)[0]
        assert result.token_ids == alone.token_ids and result.text == alone.text


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(model, tiny_tokenizer):
    a = generate(model, tiny_tokenizer, "The", max_new_tokens=15, temperature=1.0, seed=123)[0]
    b = generate(model, tiny_tokenizer, "The", max_new_tokens=15, temperature=1.0, seed=123)[0]
    c = generate(model, tiny_tokenizer, "The", max_new_tokens=15, temperature=1.0, seed=7)[0]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = generate(model, tiny_tokenizer, "The", max_new_tokens=15)[0]
    top1 = generate(model, tiny_tokenizer, "The", max_new_tokens=15, temperature=0.7, top_k=1, seed=1)[0]
    assert top1.token_ids == greedy.token_ids


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.75), g).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.75 needs the second token; the third is never needed
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), g).item() for _ in range(100)}
    assert draws == {0}


def test_stop_tokens_and_stop_strings(model, tiny_tokenizer):
    free = generate(model, tiny_tokenizer, "Bonjour", max_new_tokens=20)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    first = free.token_ids[3]
    stopped = generate(model, tiny_tokenizer, "Bonjour", max_new_tokens=20, stop_token_ids=[first])[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:free.token_ids.index(first)]
    text = free.text
    cut = text[len(text) // 2: len(text) // 2 + 3]
    if cut:
        by_string = generate(model, tiny_tokenizer, "Bonjour", max_new_tokens=20, stop=[cut])[0]
        assert by_string.finish_reason == "stop" and by_string.text == text[:text.index(cut)]


@pytest.mark.parametrize("text", ["ภาษาไทยเป็นภาษาที่สวยงาม", "አማርኛ ቋንቋ በጣም ጥሩ ነው", "中文的流式输出不能出错", "naïve café ✓"])
def test_detokenizer_never_splits_a_character(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tiny_tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_window_stays_bounded_on_bytes_that_are_never_utf8(tiny_tokenizer):
    """A model emitting lone continuation bytes forever: the detokeniser must not hold (and re-decode) an
    ever-growing window; the text comes out as it decodes, U+FFFD included, a few tokens behind."""
    lone = tiny_tokenizer.convert_tokens_to_ids(tiny_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(
        "\x80")[0][0][-1])  # the byte-level symbol of byte 0x80
    assert tiny_tokenizer.decode([lone]) == "\ufffd"
    detok = Detokenizer(tiny_tokenizer)
    pieces = [detok.push(lone) for _ in range(200)]
    assert len(detok.ids) - detok.prefix <= 2 * (Detokenizer.MAX_HELD + 1)  # the window did not grow with the stream
    assert sum(p.count("\ufffd") for p in pieces) >= 200 - 2 * (Detokenizer.MAX_HELD + 1)  # emitted as it went
    assert "".join(pieces) + detok.flush() == tiny_tokenizer.decode([lone] * 200)


def test_streaming_reassembles_to_the_non_streamed_text(model, tiny_tokenizer):
    for prompt in ["ภาษาไทย", "አማርኛ", "English"]:
        full = generate(model, tiny_tokenizer, prompt, max_new_tokens=25)[0].text
        deltas = list(stream(model, tiny_tokenizer, prompt, max_new_tokens=25))
        assert "".join(deltas) == full
        assert not any("\ufffd" in d for d in deltas) or "\ufffd" in full


def test_bad_prompts_get_clear_errors(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        generate(model, tiny_tokenizer, "")
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, tiny_tokenizer, "word " * 200)
    with pytest.raises(ValueError, match="UTF-8"):
        generate(model, tiny_tokenizer, b"\xff\xfe broken")
    with pytest.raises(ValueError, match="UTF-8"):
        generate(model, tiny_tokenizer, "bad \udcff surrogate")
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tiny_tokenizer, "hi", temperature=-1)


def test_save_then_auto_model_gives_identical_logits(model, tiny_tokenizer, tmp_path):
    save_model(model, tmp_path, tokenizer=tiny_tokenizer)
    x = torch.randint(0, model.cfg.vocab_size, (2, 19))
    expected = model(x).logits
    assert torch.equal(load_model(tmp_path).eval()(x).logits, expected)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "AetherisForCausalLM"
    assert torch.equal(hf(x).logits, expected)
    # HF-style generate goes through the recurrent decoder and agrees with ours.
    out = hf.generate(x[:1, :5], max_new_tokens=6, do_sample=False)
    assert out[0, 5:].tolist() == decode_ids(model, x[:1, :5], max_new_tokens=6)[0]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok("hello")["input_ids"] == tiny_tokenizer("hello")["input_ids"]
    # transformers' own save_pretrained round-trips too (and our loader reads what it writes).
    hf.save_pretrained(tmp_path / "hf")
    assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(x).logits, expected)
    assert torch.equal(load_model(tmp_path / "hf").eval()(x).logits, expected)


def test_broken_checkpoints_are_errors_not_random_weights(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    save_model(model, tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").rename(tmp_path / "weights.bak")
    with pytest.raises(FileNotFoundError, match="random weights"):
        load_model(tmp_path / "ok")
    # Config that does not match the weights: a different width.
    save_model(model, tmp_path / "mismatch")
    cfg = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    cfg["d_ff"] = 64
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path / "mismatch")
    with pytest.raises(ValueError, match="does not match its config"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mismatch")
    # Truncated weights file.
    save_model(model, tmp_path / "trunc")
    weights = tmp_path / "trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(tmp_path / "trunc")


def test_generate_cli_streams_text(model, tiny_tokenizer, tmp_path, capsys):
    from aetheris.cli import main

    save_model(model, tmp_path, tokenizer=tiny_tokenizer)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "Hola", "--max-new-tokens", "8"]) == 0
    expected = generate(model, tiny_tokenizer, "Hola", max_new_tokens=8)[0].text
    assert capsys.readouterr().out == "Hola" + expected + "\n"
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
