"""Imports point one way: the model never pulls in the server stack or the data/training libraries."""

import subprocess
import sys


def modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_model_and_generation_do_not_import_the_server_or_training_stack():
    # (transformers, imported by the package for the Auto-class registration, brings accelerate itself.)
    loaded = modules_after("import aetheris.model, aetheris.generation")
    for heavy in ("fastapi", "uvicorn", "xgrammar", "datasets", "matplotlib", "tensorboard"):
        assert heavy not in loaded, f"importing the model pulled in {heavy}"


def test_cli_imports_subcommands_lazily():
    loaded = modules_after("import aetheris.cli")
    assert not {"aetheris.serve", "aetheris.train", "aetheris.evaluate", "aetheris.distill"} & loaded
