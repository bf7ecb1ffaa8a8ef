"""The ``aetheris`` command. Each subcommand lives in its own module and is imported only when used,
so ``aetheris generate`` never pays for fastapi and ``aetheris serve`` never pays for datasets.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int | None``.

Every expected failure is one line on stderr and a documented exit code (``aetheris.runs``): 2 the config or
the input is wrong, 3 the loss became NaN/inf, 4 I/O (disk full, read-only, permission), 128 + N stopped by
signal N (143 SIGTERM, 130 SIGINT). ``--debug`` (or ``AETHERIS_DEBUG=1``) also prints the traceback; an
unexpected error (a bug) always does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from aetheris import runs  # cheap for every command: its one heavy import, torch, the package has loaded already

DEBUG_ENV = "AETHERIS_DEBUG"
SIGNAL_COMMANDS = ("train", "distill")  # commands whose loop stops on SIGTERM / SIGINT with a checkpoint

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
    cmd_parser.add_argument("--debug", action="store_true", help=f"print the full traceback of a failure (or set {DEBUG_ENV}=1)")
    cmd_args = cmd_parser.parse_args(argv[1:] + rest)
    debug = cmd_args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    installed = args.command in SIGNAL_COMMANDS and runs.SIGNALS.install()
    try:
        return int(module.run(cmd_args) or 0)
    except (Exception, runs.Interrupted) as err:
        code = runs.exit_code(err)
        if code is None:
            raise  # not an expected failure: a bug, whose traceback is the report
        if debug:
            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; one says so
            kind = "stopped" if code != runs.EXIT_CONFIG and code != runs.EXIT_IO else "error"
            print(f"aetheris {args.command}: {kind}: {runs.one_line(err)}", file=sys.stderr)
        return code
    finally:
        if installed:
            runs.SIGNALS.uninstall()


if __name__ == "__main__":
    sys.exit(main())
