"""Build the nano Cohere2 teacher the nano distillation configs point at (CPU, about a minute).

    python experiments/nano_teacher.py runs/nano-teacher [--steps 300]

Tiny Aya's structure scaled down (parallel block, GQA, [sliding x3, full] layers, tied embeddings,
logit_scale), a byte-level BPE with the Cohere special tokens trained on the 70-language corpus, then a
short next-token training run on the same corpus. Writes config.json, model.safetensors and tokenizer files.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Cohere2Config, Cohere2ForCausalLM

from aetheris.data import offline_corpus_documents
from aetheris.tokenizer import train_bpe_tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default="runs/nano-teacher")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vocab", type=int, default=2048)
    a = p.parse_args()
    texts = [t for d in offline_corpus_documents(max_lines_per_language=200) for t in d.text.split("\n")]
    tok = train_bpe_tokenizer(texts, vocab_size=a.vocab)
    torch.manual_seed(0)
    cfg = Cohere2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, logit_scale=0.5,
                        layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2,
                        sliding_window=64, max_position_embeddings=2048,
                        rope_parameters={"rope_type": "default", "rope_theta": 50_000.0}, tie_word_embeddings=True,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Cohere2ForCausalLM(cfg)
    ids = [i for t in texts for i in tok.encode(t, add_special_tokens=False)]
    seq = 64
    rows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(a.steps):
        loss = model(input_ids=(b := rows[torch.randint(len(rows), (16,), generator=gen)]), labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"teacher: {a.out}")


if __name__ == "__main__":
    main()
