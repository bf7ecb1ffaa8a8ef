"""The ``aetheris`` command. Each subcommand lives in its own module and is imported only when used,
so ``aetheris generate`` never pays for fastapi and ``aetheris serve`` never pays for datasets.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("aetheris.train", "train a model from scratch (config YAML + key=value overrides)"),
    "distill": ("aetheris.distill", "distill a teacher into an Aetheris student: align -> kl -> sft"),
    "generate": ("aetheris.generation", "generate text from a checkpoint"),
    "eval": ("aetheris.evaluate", "evaluate a model on XCOPA / mGSM / tool calling / perplexity"),
    "compare": ("aetheris.equity", "teacher vs student report with the Degradation Equity Score"),
    "serve": ("aetheris.serve.cli", "OpenAI-compatible HTTP server"),
    "demo": ("aetheris.demo", "the embedded CPU demo: nano teacher -> distilled student -> equity report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="aetheris", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # Parse only the command name first, then let the module define its own arguments.
    args, rest = parser.parse_known_args(argv[:1])
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    cmd_parser = argparse.ArgumentParser(prog=f"aetheris {args.command}", description=COMMANDS[args.command][1])
    module.add_arguments(cmd_parser)
    cmd_args = cmd_parser.parse_args(argv[1:] + rest)
    try:
        return int(module.run(cmd_args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:  # user errors: message, no traceback
        print(f"aetheris {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
