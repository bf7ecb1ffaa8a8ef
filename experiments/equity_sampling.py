"""Uniform vs balanced vs group-DRO sampling in stage 2, on one budget, from one aligned student.

    python experiments/equity_sampling.py --config configs/nano-distill.yaml --out runs/equity-sampling \\
        teacher.name=runs/nano-teacher kl.init=runs/nano-distill/align/student [key=value ...]

Runs ``--stages kl`` three times with the same steps, rows and seed:
  proportional  kl.balance=language, data.language_temperature=1 (p_l ∝ n_l: the data as it comes)
  balanced      kl.balance=family,   data.language_temperature=inf (every family equally often)
  dro           proportional sampling + kl.dro=true (family weights by exponentiated gradient)
and prints / writes (``<out>/comparison.json``) the held-out KL overall, per family, and its DES
(population variance of the family means; lower = fairer) for each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = {
    "proportional": ["kl.balance=language", "data.language_temperature=1"],
    "balanced": ["kl.balance=family", "data.language_temperature=.inf"],
    "dro": ["kl.balance=language", "data.language_temperature=1", "kl.dro=true"],
}


def main() -> None:
    from aetheris.distill import load_distill_config, run_kl

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", default="runs/equity-sampling")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    results = {}
    for mode, extra in MODES.items():
        cfg = load_distill_config(a.config, [*a.overrides, *extra, "run_dir=null", f"kl.train.out_dir={Path(a.out) / mode}",
                                             "kl.train.progress=false"])
        report = run_kl(cfg)
        results[mode] = {"kl": report["kl_after"]["mean"], "per_family": report["equity_after"]["per_family"],
                         "des": report["equity_after"]["des"], "worst_family": report["equity_after"]["worst_family"],
                         "kl_before": report["kl_before"]["mean"], "dro_weights": report.get("dro_weights")}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "comparison.json").write_text(json.dumps(results, indent=1))
    families = sorted({f for r in results.values() for f in r["per_family"]})
    print("| mode | KL | DES | worst | " + " | ".join(families) + " |")
    print("|---" * (4 + len(families)) + "|")
    for mode, r in results.items():
        print(f"| {mode} | {r['kl']:.4f} | {r['des']:.5f} | {r['worst_family']} | "
              + " | ".join(f"{r['per_family'].get(f, float('nan')):.3f}" for f in families) + " |")


if __name__ == "__main__":
    main()
