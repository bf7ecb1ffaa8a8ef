"""The student under transformers' own ``GenerationMixin.generate``: every decoding strategy on the O(1)
recurrent step equals our decoder, and equals the same strategy re-running the full forward per token."""

import pytest
import torch
import transformers
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from conftest import tiny_config
import aetheris  # noqa: F401  (registers the Auto classes)
from aetheris.checkpoint import save_model
from aetheris.generation import decode_ids
from aetheris.hf import AetherisHFCache
from aetheris.model import Aetheris

VOCAB = 96


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=VOCAB, max_seq_len=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Aetheris(cfg).eval()
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        model.embed.weight.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("student")
    save_model(model, folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _prompts():
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 6)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return rows, ids, mask


def test_generate_is_transformers_own(hf):
    assert type(hf).generate is transformers.GenerationMixin.generate
    assert hf.config.top_k == 1 and hf.generation_config.top_k is None  # experts per token is not a sampling cut-off
    assert hf.generation_config.eos_token_id == 2 and hf.generation_config.pad_token_id == 0


def test_greedy_left_padded_batch_equals_our_decoder(hf, monkeypatch):
    rows, ids, mask = _prompts()
    steps = []
    real_step = hf.model.step
    monkeypatch.setattr(hf.model, "step", lambda *a: steps.append(1) or real_step(*a))
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2)
    assert len(steps) == out.shape[1] - ids.shape[1] - 1  # one prefill, then one O(1) step per new token
    monkeypatch.undo()
    for i, row in enumerate(rows):
        ours = decode_ids(hf.model, torch.tensor([row]), max_new_tokens=10, stop_token_ids=[2])[0]
        assert out[i, ids.shape[1]:ids.shape[1] + len(ours)].tolist() == ours


@pytest.mark.parametrize("kwargs", [
    {"do_sample": False},
    {"num_beams": 3, "do_sample": False},
    {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.8},
], ids=["greedy", "beam", "sample"])
def test_cached_step_equals_full_forward_per_token(hf, kwargs):
    """Each strategy with the recurrent cache == the same strategy with use_cache=False, which re-runs the
    whole (left-padded) sequence through the chunked scan for every new token."""
    _, ids, mask = _prompts()
    results = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        results.append(hf.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=2,
                                   use_cache=use_cache, **kwargs))
    assert torch.equal(results[0], results[1])


def test_max_length_generation_config_stopping_criteria_logits_processor(hf):
    _, ids, mask = _prompts()
    T = ids.shape[1]
    base = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert hf.generate(ids, attention_mask=mask, max_length=T + 6, do_sample=False, pad_token_id=0).equal(base)
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert hf.generate(ids, attention_mask=mask, generation_config=config).equal(base)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= T + 3, dtype=torch.bool)

    stopped = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                          stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert stopped.equal(base[:, :T + 3])

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, 5] = 0
            return forced

    forced = hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([Force()]))
    assert (forced[:, T:] == 5).all()


def test_prefill_returns_the_recurrent_cache(hf):
    _, ids, mask = _prompts()
    out = hf(ids, attention_mask=mask, use_cache=True)
    assert isinstance(out.cache, AetherisHFCache) and out.cache.get_seq_length() == ids.shape[1]
    step = hf(torch.tensor([[5], [6], [7]]), cache=out.cache)
    full = hf(torch.cat([ids, torch.tensor([[5], [6], [7]])], 1), attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-4)
    assert hf(ids).cache is None  # scoring calls keep no state
