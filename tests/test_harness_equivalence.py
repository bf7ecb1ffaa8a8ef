"""Item-for-item equivalence with lm-evaluation-harness 0.4.13, using the harness's own task objects
(its installed YAMLs and utils.py) on our local copies of the data, and its own ``hf`` model class.

Needs the ``harness`` extra (``pip install -e '.[harness]'``); skipped without it.

- every XCOPA request (context, continuation) and every mGSM prompt and stop list (direct, native_cot,
  en_cot; 0 and 8 shots; all 250 items of all 11 languages) equals ours character by character;
- synthetic generations scored through the harness's filters + ``exact_match`` equal our scores;
- lm-eval's ``HFLM`` loading a tiny Aetheris student through ``AutoModelForCausalLM``: XCOPA
  log-likelihoods and mgsm_direct generations equal ``aetheris eval``'s.
"""

import functools
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from aetheris.tasks import mgsm, xcopa  # noqa: E402
from conftest import tiny_config  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.needs_data]

MGSM_TASKS = {"direct": "mgsm_direct_{}", "native_cot": "mgsm_native_cot_{}", "en_cot": "mgsm_en_cot_{}"}
# the harness's filter names -> our result names
MGSM_FILTERS = {"direct": ("remove_whitespace", "flexible-extract"),
                "native_cot": ("strict-match", "flexible-extract"), "en_cot": ("strict-match", "flexible-extract")}


@functools.lru_cache(maxsize=1)
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes every installed task YAML: ~25 s, so once


def harness_task(name: str, data_files: dict, num_fewshot: int = 0):
    """The harness's task ``name`` (its YAML, includes and !function utils resolved) reading local files."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._factory import load_yaml

    cfg = dict(load_yaml(task_manager()._entry(name).yaml_path, resolve_func=True))
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": data_files},
               num_fewshot=num_fewshot)
    task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(1234)  # simple_evaluate's default fewshot_random_seed
    task.build_all_requests()
    return task


@pytest.fixture(scope="module")
def mgsm_files(tmp_path_factory):
    """Our TSVs and exemplars in juletxara/mgsm's layout (the dataset the harness reads)."""
    root = tmp_path_factory.mktemp("mgsm_json")
    files = {}
    for lang in mgsm.LANGUAGES:
        train, test = root / f"{lang}_train.jsonl", root / f"{lang}_test.jsonl"
        with open(train, "w", encoding="utf-8") as f:
            for ex in mgsm.load_exemplars(lang):
                f.write(json.dumps({"question": ex["q"], "answer": ex["a"], "answer_number": ex["number"],
                                    "equation_solution": None}, ensure_ascii=False) + "\n")
        with open(test, "w", encoding="utf-8") as f:
            for doc in mgsm.load(lang):
                f.write(json.dumps({"question": doc["question"], "answer": None,
                                    "answer_number": int(doc["answer"].replace(",", "")), "equation_solution": None},
                                   ensure_ascii=False) + "\n")
        files[lang] = {"train": str(train), "test": str(test)}
    return files


def xcopa_files(lang: str) -> dict:
    (test,) = xcopa.data_files(lang, {})
    return {"validation": str(test.parent / f"val.{lang}.jsonl"), "test": str(test)}


def test_every_xcopa_request_equals_the_harness():
    compared = 0
    for lang in [code for code in xcopa.LANGUAGES if code != "nl"]:  # the harness has no Dutch XCOPA
        task = harness_task(f"xcopa_{lang}", xcopa_files(lang))
        ours = [r for doc in xcopa.load(lang, {}) for r in xcopa.requests(doc, lang)]
        theirs = [inst.arguments for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx))]
        assert theirs == ours, lang
        compared += len(ours)
    assert compared == 2 * 11 * 500


@pytest.mark.parametrize("mode", list(MGSM_TASKS))
def test_every_mgsm_prompt_and_score_equals_the_harness(mode, mgsm_files):
    import random

    rng = random.Random(0)
    for shots in (0, 8):
        for lang in mgsm.LANGUAGES:
            task = harness_task(MGSM_TASKS[mode].format(lang), mgsm_files[lang], shots)
            instances = sorted(task.instances, key=lambda i: i.doc_id)
            docs = mgsm.load(lang)
            exemplars = mgsm.sample_exemplars(mgsm.load_exemplars(lang), shots, len(docs))
            for inst, doc, ex in zip(instances, docs, exemplars, strict=True):
                context, gen_kwargs = inst.arguments
                assert context == mgsm.build_prompt(doc["question"], lang, mode, ex), (lang, doc["id"])
                assert gen_kwargs["until"] == mgsm.stop_strings(lang, mode)
            if shots:
                continue
            # Score the same responses through the harness's filters and exact_match, and through ours.
            _, _, _, regex = mgsm.PROMPTS[lang]
            answer = {"direct": "", "native_cot": regex, "en_cot": mgsm.EN_COT_REGEX}[mode]
            responses = []
            for doc in docs:
                gold = doc["answer"]
                phrase = answer.replace(r"(\-?[0-9\.\,]+)", gold).replace("\\", "") if answer else gold
                responses.append(rng.choice([
                    f" {phrase}", f"  {gold}\n", f"{phrase} and then {rng.randint(0, 99)}", f"x = {gold}.5",
                    f"-{gold}", f"{rng.randint(0, 9999)}", "no number", f"${gold}", f"{phrase}\n{gold},000",
                ]))
            for inst, response in zip(instances, responses):
                inst.resps = [response]
            for ensemble in task._filters:
                ensemble.apply(task.instances)
            strict_name, flexible_name = MGSM_FILTERS[mode]
            for inst, doc, response in zip(instances, docs, responses):
                ours_strict = mgsm.exact_match(mgsm.extract_strict(response, lang, mode), doc["answer"])
                ours_flexible = mgsm.exact_match(mgsm.extract_flexible(response), doc["answer"])
                theirs_strict = task.process_results(inst.doc, [inst.filtered_resps[strict_name]])["exact_match"]
                theirs_flexible = task.process_results(inst.doc, [inst.filtered_resps[flexible_name]])["exact_match"]
                assert (ours_strict, ours_flexible) == (theirs_strict, theirs_flexible), (lang, response)


@pytest.fixture(scope="module")
def student_folder(tiny_tokenizer, tmp_path_factory):
    import torch

    from aetheris.checkpoint import save_model
    from aetheris.model import Aetheris

    torch.manual_seed(3)
    tok = tiny_tokenizer
    cfg = tiny_config(tok, max_seq_len=2048)
    model = Aetheris(cfg).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("student")
    save_model(model, folder, tokenizer=tok)
    return folder


def test_lm_eval_hf_model_on_the_student_equals_aetheris_eval(student_folder, mgsm_files):
    from lm_eval.models.huggingface import HFLM

    from aetheris.evaluate import LM

    harness_lm = HFLM(pretrained=str(student_folder), batch_size=1, device="cpu", dtype="float32")
    ours = LM.load(str(student_folder), device="cpu", dtype="float32", batch_size=1)

    # XCOPA: the harness's requests through its own model == our log-likelihoods, item for item.
    lang, limit = "sw", 20
    task = harness_task(f"xcopa_{lang}", xcopa_files(lang))
    instances = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))[:2 * limit]
    theirs = [ll for ll, _ in harness_lm.loglikelihood(instances)]
    mine = ours.loglikelihood([r for doc in xcopa.load(lang, {})[:limit] for r in xcopa.requests(doc, lang)])
    assert theirs == pytest.approx(mine, abs=1e-4)
    acc = xcopa.run(ours, lang, {}, limit)["xcopa"].values
    assert acc == [float((0 if theirs[2 * i] >= theirs[2 * i + 1] else 1) == doc["label"])
                   for i, doc in enumerate(xcopa.load(lang, {})[:limit])]

    # bf16: with --logsoftmax-dtype model our log-likelihoods equal HFLM's default bf16 arithmetic exactly.
    harness_bf16 = HFLM(pretrained=str(student_folder), batch_size=1, device="cpu", dtype="bfloat16")
    ours_bf16 = LM.load(str(student_folder), device="cpu", dtype="bfloat16", batch_size=1, logsoftmax_dtype="model")
    theirs_bf16 = [ll for ll, _ in harness_bf16.loglikelihood(instances[:10])]
    assert theirs_bf16 == ours_bf16.loglikelihood([inst.arguments for inst in instances[:10]])

    # mgsm_direct, 2 shots: the student generates under lm-eval's HFLM (transformers' generate with
    # the harness's max_length and stopping criteria) exactly what `aetheris eval` generates.
    for lang in ("en", "ja"):
        task = harness_task(f"mgsm_direct_{lang}", mgsm_files[lang], 2)
        instances = sorted(task.instances, key=lambda i: i.doc_id)[:4]
        theirs = harness_lm.generate_until(instances)
        result = mgsm.run(ours, lang, {"mgsm_mode": "direct", "mgsm_shots": 2}, limit=4)
        assert theirs == result["mgsm"].outputs, lang
        assert any(t.strip() for t in theirs)  # the comparison is not between empty strings
        # ... and those generations score the same through the harness's filters and metric
        for inst, text in zip(instances, theirs):
            inst.resps = [text]
        for ensemble in task._filters:
            ensemble.apply(instances)
        for name, ours_name in (("remove_whitespace", "mgsm"), ("flexible-extract", "mgsm_flexible")):
            scores = [task.process_results(i.doc, [i.filtered_resps[name]])["exact_match"] for i in instances]
            assert scores == result[ours_name].values, (lang, name)
