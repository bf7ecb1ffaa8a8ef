"""Tiny models for the evaluation tests: random-weight Cohere2 causal LMs saved as HF folders."""

from __future__ import annotations

from pathlib import Path


def save_tiny_cohere2(folder: Path, tokenizer, seed: int, hidden: int = 64, layers: int = 2) -> Path:
    """A 2-layer Cohere2ForCausalLM (hidden 64, 4 heads, 2 kv heads) with the given tokenizer, saved to folder."""
    import torch
    from transformers import Cohere2Config, Cohere2ForCausalLM

    torch.manual_seed(seed)
    config = Cohere2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"][:layers] if layers <= 2 else None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Cohere2ForCausalLM(config)
    with torch.no_grad():  # random init is tiny; spread the logits so choices are not near-ties
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def harness_continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """lm-evaluation-harness's loglikelihood, written out independently for one request, unbatched:
    move the context's trailing spaces to the continuation, encode context and context+continuation with
    the tokenizer's defaults (BOS), continuation tokens = whole[len(ctx):], sum their log-probs."""
    import torch

    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(whole) - 1 - len(cont), len(whole) - 1)
    return float(sum(logp[p, t] for p, t in zip(positions, cont)))
