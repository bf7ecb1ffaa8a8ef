"""The README's commands stay true. Every `aetheris ...` line (and the `accelerate launch` one) parses with
the real subcommand parser and its config files load with its overrides; every `make X` is a Makefile
target. Running them is the job of the tests named in COVERED_BY (and CI runs `make test`)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex

import pytest

from conftest import ROOT
from aetheris.cli import COMMANDS

README = (ROOT / "README.md").read_text(encoding="utf-8")

# Which test runs each README command for real (on tiny/quick settings).
COVERED_BY = {
    "generate": "tests/test_demo.py::test_generate_chat_cli_answers (the demo's student, --chat)",
    "serve": "tests/test_demo.py::test_aetheris_serve_serves_the_student (subprocess + openai client)",
    "train": "tests/test_train.py (the train CLI on configs/tiny-test.yaml)",
    "distill": "tests/test_distill_pipeline.py::test_full_pipeline_one_command; the demo runs it stage by stage",
    "eval": "tests/test_eval_e2e.py; the demo runs it on teacher and student",
    "compare": "tests/test_eval_e2e.py; the demo runs it",
    "demo": "tests/test_demo.py (configs/demo-quick.yaml)",
}


def _commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    out = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(shlex.split(line))
    return out


def _aetheris_argv(words: list[str]) -> list[str] | None:
    if words[0] == "aetheris":
        return words[1:]
    if words[:2] == ["accelerate", "launch"] and "aetheris.cli" in words:
        return words[words.index("aetheris.cli") + 1:]
    return None


CLI = [argv for w in _commands() if (argv := _aetheris_argv(w))]


def test_every_covering_test_exists():
    """Each COVERED_BY entry names test files (and test functions) that exist, so the claim cannot rot."""
    for command, entry in COVERED_BY.items():
        named = re.findall(r"(tests/test_\w+\.py)(?:::(test_\w+))?", entry)
        assert named, f"COVERED_BY[{command!r}] names no test file"
        for path, test in named:
            assert (ROOT / path).is_file(), f"COVERED_BY[{command!r}]: {path} does not exist"
            if test:
                source = (ROOT / path).read_text(encoding="utf-8")
                assert re.search(rf"^def {test}\(", source, flags=re.M), f"COVERED_BY[{command!r}]: no {path}::{test}"


def test_the_readme_shows_the_two_setup_commands_first():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]
    assert len(CLI) >= 7


@pytest.mark.parametrize("argv", CLI, ids=lambda a: " ".join(a[:2]))
def test_every_readme_command_parses_and_its_config_loads(argv):
    name = argv[0]
    assert name in COMMANDS and name in COVERED_BY
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"aetheris {name}")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    config = getattr(args, "config", None)
    if config:
        assert (ROOT / config).is_file(), config
        overrides = getattr(args, "overrides", [])
        if name == "distill":
            from aetheris.distill import load_distill_config
            load_distill_config(ROOT / config, overrides)
        elif name == "train":
            from aetheris.train import load_config
            load_config(ROOT / config, overrides)


def test_every_make_target_in_the_readme_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = {w[1] for w in _commands() if w[0] == "make"} | set(re.findall(r"`make ([a-z-]+)", README))
    assert targets >= {"demo", "test"}
    for target in targets:
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"README names `make {target}`"


def test_readme_file_tree_lists_every_module():
    listed = set(re.findall(r"^  ([a-z_/]+\.py) ", README, flags=re.M))
    modules = {str(p.relative_to(ROOT / "aetheris")) for p in (ROOT / "aetheris").rglob("*.py")}
    modules.discard("tasks/__init__.py")
    assert modules == listed
