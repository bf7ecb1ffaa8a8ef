"""Tokenizers: a pretrained one by name or path (the teacher's, for distillation), or a small
byte-level BPE trained here with `tokenizers` for nano runs.

The trained tokenizer carries the Cohere special tokens (BOS/EOS/PAD plus the chat and tool-call
markers of Command-R7B / Tiny Aya), so one chat template and one tool-call parser work for the
teacher, a nano teacher and every student. Like Cohere's tokenizer it prepends ``<BOS_TOKEN>`` when
encoding (lm-evaluation-harness relies on that default) and never appends EOS.

Saved with every checkpoint through ``tokenizer.save_pretrained(folder)``; reloaded with
``load_tokenizer(folder)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .chat import install_chat_template

BOS_TOKEN = "<BOS_TOKEN>"
EOS_TOKEN = "<EOS_TOKEN>"
PAD_TOKEN = "<PAD>"
# Chat / tool-call markers used by Cohere's Command-R7B family (and, very likely, Tiny Aya).
COHERE_SPECIAL_TOKENS = [
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
    "<|SYSTEM_TOKEN|>",
    "<|START_RESPONSE|>",
    "<|END_RESPONSE|>",
    "<|START_ACTION|>",
    "<|END_ACTION|>",
    "<|START_TOOL_RESULT|>",
    "<|END_TOOL_RESULT|>",
    "<|START_THINKING|>",
    "<|END_THINKING|>",
]
# Order fixes the ids: PAD = 0, BOS = 1, EOS = 2, then the chat markers.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *COHERE_SPECIAL_TOKENS]

def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    isolate_spaces: bool = False,
):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``transformers`` fast tokenizer.

    Byte-level means every string in every script encodes (no unknown token); the 256 byte symbols
    are always in the vocabulary, so ``vocab_size`` must exceed 256 + the special tokens.

    ``isolate_spaces``: whitespace becomes tokens of its own instead of the first byte of the next word, so a
    word is the same tokens after a space (``in Berlin``) and after a quote (``"city": "Berlin"``). A model then
    copies a value from a request into JSON by token identity; with the usual ``ĠBerlin`` vs ``Berlin`` it must
    learn that pair for every word. Costs ~13 % more tokens on the 70-language corpus.
    """
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs more than {floor} "
            f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens). Use e.g. 512 or more."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if isolate_spaces:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+"), "isolated"), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    count = 0

    def counted():
        nonlocal count
        for text in texts:
            count += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise ValueError("cannot train a tokenizer on an empty corpus (no texts were given)")
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Cohere's tokenizer adds BOS (not EOS) on encode; keep the same default.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(COHERE_SPECIAL_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    install_chat_template(fast)  # the project's one chat template (aetheris/chat.py), saved with the tokenizer
    return fast


def load_tokenizer(name_or_path: str | os.PathLike):
    """A tokenizer from a local folder (a checkpoint or a saved tokenizer) or a hub name.

    Offline (no network, or ``HF_HUB_OFFLINE=1``) a hub name that is not in the local cache fails
    with a message saying what to do, instead of a long network traceback.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(
                f"{path} holds no tokenizer (no tokenizer.json / tokenizer_config.json). Point at a "
                "checkpoint folder saved with its tokenizer, or train one (`tokenizer.train_bpe` in the config)."
            )
        return AutoTokenizer.from_pretrained(str(path))
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise FileNotFoundError(f"tokenizer folder {name} does not exist")
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as err:  # hub unreachable / not cached / gated / no such repo
        raise FileNotFoundError(
            f"could not load tokenizer {name!r} from the Hugging Face hub or its local cache ({err.__class__.__name__}). "
            "Offline, give a local folder that holds the tokenizer files instead (e.g. a saved checkpoint); "
            "online, check the name and, for gated models such as CohereLabs/tiny-aya-*, accept the licence "
            "and run `hf auth login`."
        ) from err
