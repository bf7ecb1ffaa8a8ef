"""Evaluation tasks: XCOPA, mGSM, tool calling (xSID, generated, BFCL), parallel-text perplexity.

A task is data plus a scoring rule; per-language variation (connectors, prompts, answer regexes) is a
table inside the task's module, never a subclass (the lm-evaluation-harness habit). Every task module
provides the same four names, which ``aetheris.evaluate`` drives:

- ``NAME`` and ``languages(options) -> list[str]``: the codes the task covers;
- ``data_files(lang, options) -> list[Path]``: the files a language reads (hashed into the cache key,
  so results from another data version are never silently reused);
- ``run(lm, lang, options, limit) -> dict[str, Scores]``: per-example scores for one language, keyed
  by the result name that appears in ``results.json`` (mGSM yields ``mgsm`` and ``mgsm_flexible``).

``Scores`` is the one vocabulary between tasks, ``results.json`` and the equity report: per-example
``values`` (and optional ``weights``), the score is ``sum(values) / sum(weights)`` -- the mean for
accuracies, bits per byte when values are bits and weights are bytes -- so the bootstrap resamples
examples the same way for every task.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from aetheris.languages import unknown_language_message

TASK_NAMES = ("xcopa", "xcopa_fixed", "mgsm", "toolcall", "bfcl", "ppl")
# task name -> (module, options it sets); xcopa_fixed is XCOPA on the corrected-question copy.
_MODULES = {
    "xcopa": ("xcopa", {}),
    "xcopa_fixed": ("xcopa", {"xcopa_fixed_question": True}),
    "mgsm": ("mgsm", {}),
    "toolcall": ("toolcall", {}),
    "bfcl": ("bfcl", {}),
    "ppl": ("perplexity", {}),
}


@dataclass
class Scores:
    """Per-example scores of one result (task variant) on one language."""

    metric: str  # "acc", "exact_match", "ast_match", "bits_per_byte", "kl"
    higher_is_better: bool
    ids: list  # example ids, to pair teacher and student examples
    values: list[float]
    weights: list[float] | None = None  # None: every example weighs 1
    extra: dict[str, float] = field(default_factory=dict)  # secondary metrics (means), reported only
    outputs: list[str] | None = None  # raw generations, kept in the cache for inspection

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def score(self) -> float:
        return ratio_score(self.values, self.weights)

    def to_dict(self, n_boot: int = 1000, seed: int = 0, with_outputs: bool = False) -> dict:
        lo, hi = bootstrap_ci(self.values, self.weights, n_boot=n_boot, seed=seed)
        out = {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "n": self.n,
            "score": self.score,
            "ci95": [lo, hi],
            "extra": dict(self.extra),
            "ids": list(self.ids),
            "values": [float(v) for v in self.values],
        }
        if self.weights is not None:
            out["weights"] = [float(w) for w in self.weights]
        if with_outputs and self.outputs is not None:
            out["outputs"] = list(self.outputs)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Scores":
        return cls(
            metric=d["metric"],
            higher_is_better=d["higher_is_better"],
            ids=list(d["ids"]),
            values=list(d["values"]),
            weights=d.get("weights"),
            extra=dict(d.get("extra", {})),
            outputs=d.get("outputs"),
        )


def ratio_score(values, weights=None) -> float:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    if weights is None:
        return float(values.mean())
    return float(values.sum() / np.asarray(weights, dtype=np.float64).sum())


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) example indices drawn with replacement."""
    return rng.integers(0, n, size=(n_boot, n))


def bootstrap_ci(values, weights=None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(values)/sum(weights)`` over examples (95% by default)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    idx = bootstrap_indices(values.size, n_boot, np.random.default_rng(seed))
    num = values[idx].sum(axis=1)
    den = np.asarray(weights, dtype=np.float64)[idx].sum(axis=1) if weights is not None else values.size
    stats = num / den
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


def get_task(name: str):
    """(task module, options the name sets); an unknown name lists the valid ones."""
    if name not in _MODULES:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    module, options = _MODULES[name]
    return importlib.import_module(f"aetheris.tasks.{module}"), dict(options)


def select_languages(requested: list[str] | None, available: list[str], task: str) -> list[str]:
    """The requested languages that the task covers (all when None); unknown names list the valid ones."""
    if not requested:
        return list(available)

    lowered = {code.lower(): code for code in available}
    bad = [code for code in requested if code.lower() not in lowered]
    if bad:
        raise ValueError(f"task {task}: " + unknown_language_message(bad[0], list(available)))
    return [lowered[code.lower()] for code in requested]
