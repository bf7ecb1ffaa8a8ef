"""Generation: prefill once with the chunked scan, then O(1)-per-token recurrent decoding.

Layers: ``sample`` picks a token from logits; ``decode_tokens`` is the token-level loop over a batch
(prefill, then ``model.step`` on the fixed-size cache, dropping finished rows); ``Detokenizer`` turns a
growing token list into text deltas that never split a UTF-8 character; ``generate`` and ``stream`` are
the text-level entry points (stop strings, stop tokens, batches); ``add_arguments``/``run`` are the
``aetheris generate`` command. Imports the model, never the server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import chat
from .checkpoint import load_model
from .model import DECODE_LAYOUTS, Aetheris, apply_decode_layout
from .tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy: exact argmax, no randomness."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; not included in the output."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end generation (e.g. EOS, <|END_RESPONSE|>); not included in the output."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filtering)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


MIN_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (exact argmax): dividing logits by ~0 only overflows."""


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,)."""
    if params.temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    # Shift the top logit to 0 before dividing, so a small temperature sends the others to -inf, never
    # the top one to +inf (softmax of inf is NaN).
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token if the tokens ranked above it already reach top_p. The top token always stays,
        # also when top_p is below float32's range (1e-300 rounds to 0 and would drop everything).
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(seed) if seed is not None else None


# ---------------------------------------------------------------------------------------------------
# Token-level loop
# ---------------------------------------------------------------------------------------------------

LogitsProcessor = Callable[[Tensor, Tensor], Tensor]  # (rows (b,), logits (b, V)) -> logits (b, V)


@torch.no_grad()
def decode_tokens(model: Aetheris, input_ids: Tensor, params: SamplingParams, attention_mask: Tensor | None = None,
                  logits_processor: LogitsProcessor | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (rows, tokens, logits) per step: the batch rows still running, the token each just
    produced, and the (processed) logits it was sampled from.

    input_ids (B, T), left-padded when ``attention_mask`` has zeros. A row stops (and leaves the batch)
    after producing a stop token, which is yielded so the caller sees why it stopped.
    ``logits_processor`` may mask logits per row (e.g. a grammar); the consumer sees each token before
    the next step runs, so it can advance per-row state (a grammar matcher) in between.
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    generator = make_generator(params.seed, input_ids.device)
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=input_ids.device)
    # 1. Prefill: one chunked-scan pass over the prompt; only the last position needs logits.
    out = model(input_ids, attention_mask=attention_mask, logits_to_keep=1)
    logits, cache = out.logits[:, -1], out.cache
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    for i in range(params.max_new_tokens):
        if logits_processor is not None:
            logits = logits_processor(rows, logits)
        token = sample(logits, params, generator)                       # (b,)
        yield rows, token, logits
        done = torch.isin(token, stop_ids)
        if i == params.max_new_tokens - 1:
            return
        if done.any():
            keep = (~done).nonzero().squeeze(-1)
            if keep.numel() == 0:
                return
            rows, token, cache = rows[keep], token[keep], cache.select(keep)
        # 2. One recurrent step per token: cost independent of how long the context is.
        logits = model.step(token, cache)


def decode_ids(model: Aetheris, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 20,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
    """New token ids per row (a final stop token is kept, as transformers does)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_token_ids=list(stop_token_ids))
    new: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for rows, tokens, _ in decode_tokens(model, input_ids, params, attention_mask):
        for r, t in zip(rows.tolist(), tokens.tolist()):
            new[r].append(t)
    return new


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------

class Detokenizer:
    """Incremental detokenisation that never emits half a character.

    Byte-level BPE splits multi-byte characters (Thai, Amharic, CJK) across tokens; decoding tokens one
    at a time yields U+FFFD. We decode a short window ``ids[prefix:]`` and emit only the text past
    ``ids[prefix:read]``, holding back while the window ends in an incomplete character. A character is at
    most 4 bytes, so a window holding back more than ``MAX_HELD`` tokens is not waiting for one: the model
    is producing bytes that are not UTF-8 (or only invisible tokens). That text is emitted as it decodes
    (with U+FFFD), which keeps each push's cost and the stream's latency bounded.
    """

    MAX_HELD = 8

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0    # ids[:read] are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done_text = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        waiting = text.endswith("\ufffd") or len(text) <= len(done_text)
        if waiting and len(self.ids) - self.read <= self.MAX_HELD:
            return ""  # incomplete character (or nothing visible yet): wait for more tokens
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done_text):]

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        done_text = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done_text):]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int


def check_prompt(prompt: str | bytes) -> str:
    """Prompts must be non-empty, valid UTF-8 text."""
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"prompt is not valid UTF-8 (byte {err.start}: {prompt[err.start:err.start + 4]!r}); "
                             "pass text encoded as UTF-8") from None
    try:
        prompt.encode("utf-8")  # lone surrogates (e.g. undecodable bytes from argv) fail here
    except UnicodeEncodeError as err:
        raise ValueError(f"prompt is not valid UTF-8 text (position {err.start}); pass text encoded as UTF-8") from None
    if not prompt:
        raise ValueError("prompt is empty; give the model some text to continue")
    return prompt


def encode_prompts(model: Aetheris, tokenizer, prompts: Sequence[str | bytes | list[int]]) -> tuple[Tensor, Tensor]:
    """Tokenise and left-pad: (input_ids, attention_mask), both (B, T_max)."""
    rows = []
    for p in prompts:
        ids = list(p) if isinstance(p, list) else tokenizer(check_prompt(p))["input_ids"]
        if not ids:
            raise ValueError("prompt encodes to zero tokens; give the model some text to continue")
        if len(ids) > model.cfg.max_seq_len:
            raise ValueError(f"prompt has {len(ids)} tokens, more than the model's limit max_seq_len="
                             f"{model.cfg.max_seq_len}; shorten it")
        if max(ids) >= model.cfg.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {model.cfg.vocab_size}); does the tokenizer "
                             "belong to this model?")
        rows.append(ids)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    return left_pad(rows, pad, model.embed.weight.device)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Token rows left-padded to the longest: (input_ids, attention_mask), both (B, T_max), mask 0 at padding.
    Left padding keeps every row's last token in the last column, where decoding continues."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return input_ids.to(device), mask.to(device)


def _stop_ids(tokenizer, params: SamplingParams) -> SamplingParams:
    ids = list(params.stop_token_ids)
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return SamplingParams(**{**params.__dict__, "stop_token_ids": ids})


class TextState:
    """Per-row text assembly (shared with the server): detokenise, find stop strings, hold back text a stop string might start.

    Stop strings are matched with one Knuth-Morris-Pratt automaton each, fed every new character once, so
    finding them and deciding how much to hold back costs O(new text) per token, however long the
    generation or the stop strings.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.detok = Detokenizer(tokenizer)
        self.stop = stop
        self.fail = [_failure(s) for s in stop]
        self.matched = [0] * len(stop)  # per stop string: length of the longest text suffix that is its prefix
        self.text = ""      # text so far (stop string excluded once found)
        self.emitted = 0    # characters already handed to a stream consumer
        self.ids: list[int] = []
        self.finish: str | None = None
        self.prompt_tokens = 0

    def push(self, token: int, is_stop_token: bool, last: bool) -> None:
        if is_stop_token:
            self.text += self.detok.flush()
            self.finish = "stop"
            return
        self.ids.append(token)
        before = len(self.text)
        self.text += self.detok.push(token) + (self.detok.flush() if last else "")
        hits = self._scan(before)
        if hits:
            self.text = self.text[:min(hits)]
            self.finish = "stop"
        elif last:
            self.finish = "length"

    def _scan(self, start: int) -> list[int]:
        """Advance the automata over text[start:]; the start of each stop string's first completed match."""
        hits = []
        for j, (s, fail) in enumerate(zip(self.stop, self.fail)):
            k = self.matched[j]
            for i in range(start, len(self.text)):
                c = self.text[i]
                while k and s[k] != c:
                    k = fail[k - 1]
                if s[k] == c:
                    k += 1
                if k == len(s):
                    hits.append(i + 1 - k)
                    break
            self.matched[j] = k
        return hits

    def ready(self) -> str:
        """New text that can no longer become part of a stop string."""
        end = len(self.text)
        if self.finish is None and self.stop:
            end -= max(self.matched)  # the longest tail that is a prefix of a stop string
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta


def _failure(s: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[k] != s[i]:
            k = fail[k - 1]
        if s[k] == s[i]:
            k += 1
        fail[i] = k
    return fail


def _run(model: Aetheris, tokenizer, prompts, params: SamplingParams) -> Iterator[tuple[int, str, TextState]]:
    """Shared loop of ``generate`` and ``stream``: yields (row, new text, state) as text becomes final."""
    params = _stop_ids(tokenizer, params)
    input_ids, mask = encode_prompts(model, tokenizer, prompts)
    states = [TextState(tokenizer, params.stop) for _ in prompts]
    for i, st in enumerate(states):
        st.prompt_tokens = int(mask[i].sum())
    if params.max_new_tokens == 0:
        for i, st in enumerate(states):
            st.finish = "length"
            yield i, "", st
        return
    stop_set = set(params.stop_token_ids)
    step = 0
    for rows, tokens, _ in decode_tokens(model, input_ids, params, mask):
        step += 1
        for r, t in zip(rows.tolist(), tokens.tolist()):
            st = states[r]
            if st.finish is not None:
                continue  # finished on a stop string; its row is dropped once the loop notices
            st.push(t, t in stop_set, last=step == params.max_new_tokens)
            yield r, st.ready(), st
        if all(st.finish is not None for st in states):
            return


def generate(model: Aetheris, tokenizer, prompts: Sequence[str | bytes | list[int]] | str, **kwargs) -> list[GenerationResult]:
    """Generate for a batch of prompts. kwargs are ``SamplingParams`` fields."""
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    params = SamplingParams(**kwargs)
    results: dict[int, TextState] = {}
    for row, _, st in _run(model, tokenizer, list(prompts), params):
        results[row] = st
    return [GenerationResult(st.text, st.ids, st.finish or "length", st.prompt_tokens)
            for _, st in sorted(results.items())]


def stream(model: Aetheris, tokenizer, prompt: str | bytes | list[int], **kwargs) -> Iterator[str]:
    """Yield text deltas for one prompt as they become final (UTF-8-safe, stop strings held back)."""
    for _, delta, _ in _run(model, tokenizer, [prompt], SamplingParams(**kwargs)):
        if delta:
            yield delta


# ---------------------------------------------------------------------------------------------------
# CLI: aetheris generate
# ---------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors + tokenizer)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    parser.add_argument("--no-stream", action="store_true", help="print each completion at the end")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user turn through the chat template; print the assistant's answer")
    add_decode_layout_argument(parser)


def add_decode_layout_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode-layout", choices=DECODE_LAYOUTS, default="linear",
                        help="weight layout for decoding on CPU: linear (nn.Linear's, default); packed (oneDNN's "
                             "prepacked layout: faster batch-1 steps for wide models, slower for tiny ones, no extra "
                             "memory, inference only); packed-head (also a packed copy of a tied LM head: "
                             "vocab x d_model more bytes); compiled (batch-1 steps through a torch.compile'd matvec "
                             "on nn.Linear's layout, the tied head included, and experts' long rows in column "
                             "blocks: no extra memory, seconds to compile at load, inference only when blocks were "
                             "made; the fastest batch-1 CPU decoding for wide models, slower for tiny ones)")


def use_decode_layout(model: Aetheris, layout: str, prog: str) -> None:
    """Apply ``--decode-layout`` (``model.apply_decode_layout``); where it cannot apply (not CPU, no oneDNN or C++
    compiler, a dtype other than float32/bfloat16) say why in one line on stderr and keep the default layout."""
    reason = apply_decode_layout(model, layout)
    if reason is not None:
        print(f"{prog}: note: --decode-layout {layout} not used: {reason}; decoding with the default layout",
              file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model).eval()
    use_decode_layout(model, args.decode_layout, "aetheris generate")
    tokenizer = load_tokenizer(args.model)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop)
    prompts, shown = list(args.prompt), list(args.prompt)
    if args.chat:
        prompts, kwargs["stop_token_ids"] = chat_prompts(tokenizer, args.prompt)
        shown = [""] * len(prompts)  # print the answer only
    if len(prompts) == 1 and not args.no_stream:
        sys.stdout.write(shown[0])
        for delta in stream(model, tokenizer, prompts[0], **kwargs):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for prompt, result in zip(shown, generate(model, tokenizer, prompts, **kwargs)):
        print(f"{prompt}{result.text}\n[{result.finish_reason}, {len(result.token_ids)} tokens]")
    return 0


def chat_prompts(tokenizer, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Each text as one user turn, rendered by ``aetheris.chat`` and opened as a text answer
    (``<|START_RESPONSE|>``); stop on the end-of-answer / end-of-turn markers. Returns (token ids, stop ids)."""
    missing = [t for t in (chat.START_RESPONSE, chat.END_RESPONSE, chat.END_TURN)
               if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise ValueError(f"--chat needs the chat markers {', '.join(missing)} in the tokenizer; this checkpoint's "
                         "tokenizer lacks them (a from-scratch run without SFT): drop --chat to continue raw text")
    ids = [tokenizer(chat.render_messages([{"role": "user", "content": t}]) + chat.START_RESPONSE,
                     add_special_tokens=False)["input_ids"] for t in texts]
    stops = [tokenizer.convert_tokens_to_ids(t) for t in (chat.END_RESPONSE, chat.END_TURN)] + [tokenizer.eos_token_id]
    return ids, [i for i in stops if i is not None]
