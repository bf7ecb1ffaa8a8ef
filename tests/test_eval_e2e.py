"""End to end through the CLI: `aetheris eval` on a tiny teacher and student, then `aetheris compare`;
resuming from the cache, refusing a cache from another model, and the bad-input errors."""

import json

import pytest

from aetheris.cli import main
from eval_helpers import save_tiny_cohere2

pytestmark = pytest.mark.needs_data
LANGS = "zh,th,sw"  # three families; XCOPA, mGSM and ppl cover all three, xSID only zh
ARGS = ["--tasks", "xcopa,mgsm,toolcall,ppl", "--languages", LANGS, "--limit", "2", "--mgsm-shots", "0",
        "--batch-size", "4"]


@pytest.fixture(scope="module")
def runs(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    teacher = save_tiny_cohere2(root / "teacher", tiny_tokenizer, seed=10)
    student = save_tiny_cohere2(root / "student", tiny_tokenizer, seed=11)
    assert main(["eval", "--model", str(teacher), "--output", str(root / "eval_t"), *ARGS]) == 0
    assert main(["eval", "--model", str(student), "--output", str(root / "eval_s"), "--teacher", str(teacher), *ARGS]) == 0
    assert main(["compare", "--teacher", str(root / "eval_t"), "--student", str(root / "eval_s"),
                 "--output", str(root / "report"), "--n-boot", "100"]) == 0
    return root


def test_results_json(runs):
    res = json.loads((runs / "eval_s" / "results.json").read_text(encoding="utf-8"))
    assert set(res["tasks"]) == {"xcopa", "mgsm", "mgsm_flexible", "toolcall_xsid", "ppl", "kl"}
    assert set(res["tasks"]["xcopa"]["languages"]) == {"zh", "th", "sw"}
    assert set(res["tasks"]["ppl"]["languages"]) == {"zh", "th", "sw"}
    assert set(res["tasks"]["toolcall_xsid"]["languages"]) == {"zh"}
    for task in res["tasks"].values():
        for entry in task["languages"].values():
            lo, hi = entry["ci95"]
            assert entry["n"] == 2 and lo <= entry["score"] <= hi
    assert res["tasks"]["ppl"]["languages"]["sw"]["score"] > 0
    assert res["tasks"]["kl"]["languages"]["sw"]["score"] > 0


def test_report_files(runs):
    import matplotlib.image

    out = runs / "report"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for name in ("xcopa", "mgsm", "mgsm_flexible", "toolcall_xsid", "ppl"):
        t = report["tasks"][name]
        for key in ("des", "des_relative", "des_branch", "worst_family", "max_min_gap", "des_ci95", "families", "branches"):
            assert key in t
        for v in t["languages"].values():
            assert {"teacher", "student", "drop", "relative_drop"} <= set(v)
    assert report["tasks"]["ppl"]["higher_is_better"] is False
    assert "summary" in report and "kl" in report
    assert "Degradation Equity" in (out / "report.md").read_text(encoding="utf-8")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        assert matplotlib.image.imread(png).ndim == 3


def test_rerun_resumes_from_cache(runs, capsys):
    before = (runs / "eval_t" / "results.json").read_text(encoding="utf-8")
    assert main(["eval", "--model", str(runs / "teacher"), "--output", str(runs / "eval_t"), *ARGS]) == 0
    err = capsys.readouterr().err
    assert "[cached] xcopa zh" in err and "[done]" not in err
    after = json.loads((runs / "eval_t" / "results.json").read_text(encoding="utf-8"))
    assert after["tasks"] == json.loads(before)["tasks"]


def test_cache_from_another_model_or_setting_is_refused(runs, capsys):
    rc = main(["eval", "--model", str(runs / "student"), "--output", str(runs / "eval_t"),
               "--tasks", "xcopa", "--languages", "zh", "--limit", "2"])
    assert rc == 2 and "different model" in capsys.readouterr().err
    rc = main(["eval", "--model", str(runs / "teacher"), "--output", str(runs / "eval_t"),
               "--tasks", "xcopa", "--languages", "zh", "--limit", "1"])
    assert rc == 2 and "limit" in capsys.readouterr().err


def test_bad_input_messages(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--tasks", "xcopa,copa"]) == 2
    assert "valid tasks: xcopa, xcopa_fixed, mgsm, toolcall, bfcl, ppl" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--tasks", "xcopa",
                 "--languages", "zz"]) == 2
    err = capsys.readouterr().err
    assert "unknown language code 'zz'" in err and "et, ht, id" in err
    # a model that cannot be loaded fails before any work (no output folder is created)
    assert main(["eval", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--tasks", "xcopa"]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["eval", "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--tasks", "xcopa"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["compare", "--teacher", str(tmp_path), "--student", str(tmp_path), "--output", str(tmp_path / "r")]) == 2
    assert "aetheris eval" in capsys.readouterr().err


def test_missing_data_names_the_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AETHERIS_DATA_DIR", str(tmp_path))
    assert main(["eval", "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--tasks", "mgsm"]) == 2
    err = capsys.readouterr().err
    assert "AETHERIS_DATA_DIR" in err and "mgsm_bn.tsv" in err


def test_aetheris_checkpoint_through_the_adapter(tiny_tokenizer, tmp_path):
    """An Aetheris student loads like any HF causal LM; batching (right-padded scoring, left-padded
    generation) does not change its log-likelihoods or generations."""
    from aetheris.checkpoint import save_model
    from aetheris.config import AetherisConfig
    from aetheris.evaluate import LM
    from aetheris.model import Aetheris
    from aetheris.tasks import mgsm, xcopa

    tok = tiny_tokenizer
    cfg = AetherisConfig(vocab_size=len(tok), d_model=64, n_layer=2, n_heads=4, head_dim=16, d_state=16, n_groups=2,
                         d_ff=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    save_model(Aetheris(cfg), tmp_path / "aeth", tokenizer=tok)
    batched, single = LM.load(str(tmp_path / "aeth"), batch_size=3), LM.load(str(tmp_path / "aeth"), batch_size=1)
    reqs = [r for d in xcopa.load("zh", {})[:3] for r in xcopa.requests(d, "zh")]
    assert batched.loglikelihood(reqs) == pytest.approx(single.loglikelihood(reqs), abs=1e-4)
    prompts = [mgsm.build_prompt(d["question"], "sw") for d in mgsm.load("sw")[:3]]
    assert batched.generate_until(prompts, mgsm.stop_strings("sw"), 32) == single.generate_until(prompts, mgsm.stop_strings("sw"), 32)
