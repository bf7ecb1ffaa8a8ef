"""The server's caps (``Limits``) and the ``aetheris serve`` flags derived from them, one per field."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields


def _cap(default, help: str, minimum: float = 1):
    """A Limits field: its default, the help its flag shows, and the smallest value that makes sense."""
    return field(default=default, metadata={"help": help, "minimum": minimum})


@dataclass
class Limits:
    """Every cap of the server (SERVING.md, "Limits and security", lists them with their flags)."""
    max_body_bytes: int = _cap(4 << 20, "request body size; larger -> 413")
    max_tokens: int = _cap(2048, "cap on max_tokens per request (and the default when a request gives none)")
    max_prompt_tokens: int = _cap(8192, "prompt tokens per request (also bounded by the model's max_seq_len)")
    max_prompt_bytes: int = _cap(256 << 10, "rendered prompt size, checked before tokenising "
                                            "(32 bytes per token of 8192)")
    max_n: int = _cap(8, "choices per request")
    max_queue: int = _cap(64, "requests waiting for the decode worker; more -> 429")
    max_batch: int = _cap(32, "sequences decoded together in one step")
    prefill_tokens: int = _cap(16384, "bound on one batched prefill: prompts x longest prompt (padded)")
    threads: int = _cap(0, "torch threads of the decode worker; 0 = all cores but one", minimum=0)
    max_tools: int = _cap(128, "tools per request")
    # JSON schemas (tools and response_format of one request together): grammar compilation grows
    # superlinearly with the number of optional properties, so these bound its time.
    max_schema_properties: int = _cap(256, "JSON-schema properties per request (tools + response_format)")
    max_schema_enum: int = _cap(1024, "JSON-schema enum and const values per request")
    max_schema_depth: int = _cap(16, "nesting of JSON subschemas")
    max_schema_nodes: int = _cap(2048, "JSON subschemas per request in all")
    max_schema_regex: int = _cap(1024, "regex size (bounded repetitions multiplied out) of all patterns together")
    max_schema_number: float = _cap(1e15, "largest |minimum|, |maximum|, ... in a schema (wider float ranges "
                                          "compile slowly)")
    max_logit_bias: int = _cap(300, "logit_bias entries per request")
    compile_slots: int = _cap(2, "grammar compilations running at once (others wait)")
    compile_wait_s: float = _cap(10.0, "longest wait for a compile slot before a 503", minimum=0)
    max_connections: int = _cap(256, "HTTP requests in flight; more -> 503")
    header_timeout_s: float = _cap(10.0, "a connection must send a request's headers within this many seconds",
                                   minimum=0.001)
    body_timeout_s: float = _cap(30.0, "a request's body must arrive within this many seconds (slow clients: 408)",
                                 minimum=0.001)
    keep_alive_s: float = _cap(5.0, "idle keep-alive connections close after this many seconds", minimum=0)
    max_header_bytes: int = _cap(16 << 10, "size of a request's headers")

    def __post_init__(self):
        for f in fields(self):
            value, minimum = getattr(self, f.name), f.metadata["minimum"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
                raise ValueError(f"--{flag_name(f.name)} must be a number >= {minimum:g}, got {value!r}")


def flag_name(name: str) -> str:
    return name.replace("_", "-")


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per Limits field, typed, defaulted and explained by the field itself."""
    group = parser.add_argument_group("limits (see docs/SERVING.md, \"Limits and security\")")
    for f in fields(Limits):
        kind = float if f.type in (float, "float") else int
        group.add_argument(f"--{flag_name(f.name)}", type=kind, default=f.default, dest=f.name,
                           metavar=kind.__name__.upper(), help=f"{f.metadata['help']} (default: {f.default:g})")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The Limits given on the command line (each checked by ``Limits.__post_init__``)."""
    return Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
