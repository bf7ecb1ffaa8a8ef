"""The embedded CPU demo (``make demo``): train ``configs/nano-scratch.yaml`` from scratch on the
70-language offline corpus, then print the validation loss per language and a sample generation
for a few languages. (The distillation issue later turns this into the full teacher -> student story.)

    python -m aetheris.demo [key.sub=value ...]     # e.g. train.max_steps=50 for a quicker look
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "nano-scratch.yaml"
# Opening words of held-out NTREX-style news sentences, one per script family shown.
PROMPTS = {
    "en": "The government said on Monday that",
    "sw": "Serikali ilisema siku ya Jumatatu kwamba",
    "hi": "सरकार ने सोमवार को कहा कि",
    "zh": "政府周一表示，",
    "ar": "وقالت الحكومة يوم الاثنين إن",
    "ru": "Правительство заявило в понедельник, что",
}


def main(argv: list[str] | None = None) -> int:
    from aetheris.data import resolve_languages
    from aetheris.generation import generate
    from aetheris.languages import get_language
    from aetheris.train import load_config, train

    overrides = sys.argv[1:] if argv is None else argv
    cfg = load_config(CONFIG, overrides)
    print(f"Training {CONFIG.name} from scratch on {len(resolve_languages(cfg.data.languages))} languages of the offline corpus "
          f"({cfg.train.max_steps} steps, out_dir {cfg.train.out_dir}) ...", flush=True)
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    first, last = result.val_history[0], result.val_history[-1]
    print(f"\nValidation loss (mean over {len(last['loss'])} languages): {first['mean']:.3f} at step "
          f"{first['step']} -> {last['mean']:.3f} at step {last['step']}  ({minutes:.1f} min)")
    ranked = sorted(last["loss"].items(), key=lambda kv: kv[1])
    show = lambda items: ", ".join(f"{get_language(c).name} {v:.2f}" for c, v in items)  # noqa: E731
    print(f"  lowest:  {show(ranked[:5])}\n  highest: {show(ranked[-5:])}")

    model = result.model.eval()
    print("\nSample generations (greedy, 24 new tokens; a nano model babbles, but in the right script):")
    outputs = generate(model, result.tokenizer, list(PROMPTS.values()), max_new_tokens=24, temperature=0.0,
                       stop_token_ids=[result.tokenizer.eos_token_id])
    for (code, prompt), out in zip(PROMPTS.items(), outputs):
        print(f"  [{code}] {prompt}{out.text.rstrip()}")
    print(f"\nCheckpoint: {result.last_checkpoint}\n"
          f"TensorBoard: tensorboard --logdir {result.out_dir}\n"
          f"Generate:    aetheris generate --model {result.last_checkpoint}/model --prompt 'Habari'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
