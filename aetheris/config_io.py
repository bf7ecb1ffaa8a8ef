"""YAML configs for runs: load a file, apply ``key.sub=value`` overrides, build nested dataclasses.

Every key is checked against the dataclass fields; a key that does not exist is an error naming the
nearest valid key (``train.lr_warmup`` -> "did you mean train.warmup_steps?"). Override values are
parsed as YAML, so ``train.lr=3e-4``, ``data.languages=[en,sw]`` and ``train.max_steps=20`` all work.

Every key is described by its field's attribute docstring (the string literal right below the field, as in
litgpt): ``--help-config`` on each command that takes a config lists every dotted key with its type, default
and that description (``config_help``), and ``tests/test_config_help.py`` refuses a key without one. A section
(a dataclass-typed field) without a docstring of its own is described by its class's docstring.

A ``dict`` field is a mapping of free-form keys; an override sets one entry (``student.options.top_k=2``)
on top of the YAML's mapping, or of the field's default when the YAML has none. A dict field whose
``metadata={"keys": SomeDataclass}`` names a dataclass takes only that dataclass's fields as keys, checked
and typed like any other key (nearest-key hint, numbers parsed).

A ``list[A | B | ...]`` field whose members are dataclasses with a ``type`` class attribute is a tagged
union (``data.sources``): each entry picks its dataclass by ``type`` (an unknown one lists the valid ones) and
is built like a section, so its keys are checked and its ``__post_init__`` runs; errors name the entry
(``sft.sources[1].per_language``). A key a dataclass lists in ``RENAMED_KEYS`` (old -> new) is refused with
a one-line message naming the new key.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and what to change."""


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist (the shipped ones are in configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections at the top level, got {type(data).__name__}")
    return data


def schema_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key a dataclass tree accepts (sections and leaves; the keys of typed dict fields)."""
    return [key for key, *_ in _walk(cls, prefix)]


def _walk(cls, prefix: str = "", base=None):
    """(dotted key, field, class declaring it, type hint, default) for every key of a dataclass tree, in field order.
    ``base``: the instance (or typed dict) whose values are the defaults, when they are not the class's own
    (``kl.train`` defaults to ``lr=5e-5``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        if isinstance(base, dict):
            default = base.get(f.name, _field_default(f))
        else:
            default = getattr(base, f.name) if base is not None else _field_default(f)
        yield key, f, cls, hints.get(f.name), default
        sub = _dataclass_of(hints.get(f.name))
        if sub is not None:
            yield from _walk(sub, key + ".", default if isinstance(default, sub) else None)
        elif _dict_keys(f) is not None:
            yield from _walk(_dict_keys(f), key + ".", default if isinstance(default, dict) else None)


def _tagged_members(tp) -> dict[str, type] | None:
    """For ``list[A | B | ...]`` of dataclasses that each carry a ``type`` tag: tag -> dataclass; else None."""
    if typing.get_origin(tp) is not list or len(typing.get_args(tp)) != 1:
        return None
    return _union_members(typing.get_args(tp)[0])


def _union_members(tp) -> dict[str, type] | None:
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if all(dataclasses.is_dataclass(m) and isinstance(getattr(m, "type", None), str) for m in members):
        return {m.type: m for m in members}
    return None


def build_tagged_list(union, data, where: str) -> list:
    """A list of ``union``'s dataclasses (``A | B``, each with a ``type`` tag) from dicts (typed entries are kept)."""
    members = _union_members(union)
    if members is None:
        raise TypeError(f"{union} is not a union of dataclasses with a `type` tag")
    example = f"[{{type: {next(iter(members))}}}]"
    if not isinstance(data, list):
        raise ConfigError(f"{where}={data!r}: give a list of sources, e.g. {example}")
    out = []
    for i, item in enumerate(data):
        at = f"{where}[{i}]"
        if isinstance(item, tuple(members.values())):
            out.append(item)
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"{at}={item!r} must be a mapping with a type: ({', '.join(members)})")
        kind = item.get("type")
        if kind not in members:
            got = "needs a type" if kind is None else f"has type {kind!r}"
            hint = _nearest(str(kind), list(members)) if kind is not None else ""
            raise ConfigError(f"{at} {got}: one of {', '.join(members)}{hint}")
        out.append(build(members[kind], {k: v for k, v in item.items() if k != "type"}, f"{at}."))
    return out


def _renamed(cls, key: str, where: str, rest: str = "") -> None:
    """A ConfigError naming the new key when ``key`` is one ``cls`` renamed. ``RENAMED_KEYS`` maps an old key
    to its new name (relative to ``cls``; it may move into a subsection) or to ``(new name, why)``; ``rest`` is
    the part of a dotted override below the renamed key."""
    entry = getattr(cls, "RENAMED_KEYS", {}).get(key)
    if entry is not None:
        new, why = (entry, "") if isinstance(entry, str) else entry
        raise ConfigError(f"config key {where + key + rest!r} was renamed: write {where + new + rest!r} instead"
                          + (f" ({why})" if why else ""))


def _section(cls, parts: list[str]):
    """The dataclass a dotted section path leads to, or None."""
    for part in parts:
        cls = _dataclass_of(typing.get_type_hints(cls).get(part)) if dataclasses.is_dataclass(cls) else None
    return cls


def _is_dict(tp) -> bool:
    """``dict``, ``dict[K, V]``, or either of them ``| None``."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(a is dict or typing.get_origin(a) is dict for a in args)


def _dict_keys(f: dataclasses.Field):
    """The dataclass whose fields a dict field's keys must be (``metadata={"keys": cls}``), else None."""
    return f.metadata.get("keys")


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _locate(cls, parts: list[str]) -> tuple[int, dataclasses.Field] | None:
    """If a prefix ``parts[:i+1]`` of a dotted key names a dict field, (i, that field); else None."""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        if part not in fields:
            return None
        hint = typing.get_type_hints(cls).get(part)
        if _is_dict(hint):
            return i, fields[part]
        cls = _dataclass_of(hint)
        if cls is None:
            return None
    return None


def _nearest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not near:  # compare the last component too: "train.lrate" ~ "train.lr"
        last = {k.rsplit(".", 1)[-1]: k for k in valid}
        hit = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(last), n=1, cutoff=0.6)
        near = [last[hit[0]]] if hit else []
    return f"; did you mean {near[0]!r}?" if near else ""


def apply_overrides(raw: dict, overrides: list[str], cls) -> dict:
    """Set ``a.b.c=value`` entries on the raw dict; keys are checked against ``cls``'s schema."""
    valid = schema_keys(cls)
    seen: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.max_steps=20)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in seen:  # the last one winning silently hides a typo'd command line
            raise ConfigError(f"{key} is set twice ({seen[key]!r} and {item!r}): keep one")
        seen[key] = item
        parts = key.split(".")
        in_dict = _locate(cls, parts)
        free_form = in_dict is not None and _dict_keys(in_dict[1]) is None and in_dict[0] == len(parts) - 2
        if key not in valid and not free_form:
            for i in range(len(parts)):  # a renamed key anywhere on the path (``train.lr`` -> ``align.train.lr``)
                if (owner := _section(cls, parts[:i])) is None:
                    break
                _renamed(owner, parts[i], "".join(p + "." for p in parts[:i]), "".join("." + p for p in parts[i + 1:]))
            raise ConfigError(f"unknown config key {key!r} in override {item!r}{_nearest(key, valid)}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = raw
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                # A dict field the YAML leaves out starts from its default, so one entry can be changed.
                seed = _field_default(in_dict[1]) if in_dict is not None and i == in_dict[0] else None
                node[part] = to_dict(seed) if seed is not None else {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def _dataclass_of(tp):
    """The dataclass inside a type hint (``X``, ``X | None``, ``Optional[X]``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def build(cls, data: dict | None, where: str = "", base=None):
    """Construct dataclass ``cls`` from a dict, recursing into dataclass-typed fields.

    ``base``: an instance whose values stand in for keys the dict leaves out. A section whose field default
    differs from its class's own defaults (``kl.train`` defaults to ``lr=5e-5``, not ``TrainConfig``'s 3e-4)
    is built on top of that default, so setting one key of it keeps the section's other defaults."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {name: getattr(base, name) for name in fields} if base is not None else {}
    for key, value in data.items():
        if key not in fields:
            _renamed(cls, key, where)
            valid = [f"{where}{k}" for k in schema_keys(cls)]
            raise ConfigError(f"unknown config key {where + key!r}{_nearest(where + key, valid)}")
        sub = _dataclass_of(hints.get(key))
        if sub is not None and (value is not None or hints.get(key) is sub):
            value = build(sub, value, f"{where}{key}.", _section_default(fields[key], sub, base))
        elif _tagged_members(hints.get(key)) is not None and value is not None:
            value = build_tagged_list(typing.get_args(hints[key])[0], value, f"{where}{key}")
        elif _dict_keys(fields[key]) is not None and value is not None:
            value = _build_typed_dict(_dict_keys(fields[key]), value, f"{where}{key}.")
        else:
            value = _coerce(value, hints.get(key), where + key)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None
    except ConfigError as err:  # a section's own check names its key; say which section it is in
        if where and not str(err).startswith(where):
            raise ConfigError(f"{where}{err}") from None
        raise


def _section_default(f: dataclasses.Field, sub, base):
    """The default a dataclass-typed field starts from, when it is not simply ``sub()``."""
    default = getattr(base, f.name) if base is not None else _field_default(f)
    return default if isinstance(default, sub) and default != sub() else None


def _build_typed_dict(keys_cls, data, where: str) -> dict:
    """A dict field whose keys are ``keys_cls``'s fields: unknown keys name the nearest one; values are typed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where[:-1]} must be a mapping of {keys_cls.__name__} fields, got {type(data).__name__}: {data!r}")
    hints, names = typing.get_type_hints(keys_cls), _field_names(keys_cls)
    valid = [f"{where}{k}" for k in names]
    out = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key {where + str(key)!r} ({keys_cls.__name__} has no field "
                              f"{key!r}){_nearest(where + str(key), valid)}")
        out[key] = _coerce(value, hints[key], where + key)
    return out


def _coerce(value, tp, key: str):
    """Numbers written the way YAML 1.1 reads as strings (``1e-3``) become numbers; wrong types are errors."""
    allowed = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    if value is None or tp is None or Any in allowed:
        return value
    if float in allowed and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be a number") from None
    if int in allowed and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be an integer") from None
    if int in allowed and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if bool in allowed and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    if str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a folder or name that YAML read as a number (run_dir=2024)
    scalars = {int, float, str, bool}
    if allowed & scalars and allowed <= scalars | {type(None)} and isinstance(value, (dict, list)):
        raise ConfigError(f"{key}={value!r} must be a single {' or '.join(sorted(t.__name__ for t in allowed & scalars))}")
    return value


def to_dict(obj) -> Any:
    """Plain data (dicts, lists, numbers, strings) for YAML / JSON."""
    if dataclasses.is_dataclass(obj):
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------
# Descriptions: --help-config


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """A dataclass's attribute docstrings by field name (inherited fields too), whitespace folded to one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (defined interactively): no descriptions, not an error
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _class_doc(cls) -> str:
    """The first paragraph of a class's own docstring ('' for the signature dataclasses write when there is none)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str
    type: str
    default: str  # as YAML writes it; '' for a section
    help: str  # '' when the key has no description


def describe_keys(cls) -> list[KeyDoc]:
    """Every key of ``schema_keys(cls)`` with its type, default and description."""
    out = []
    for key, f, owner, hint, default in _walk(cls):
        sub = _dataclass_of(hint)
        text = field_docs(owner).get(f.name, "") or (_class_doc(sub) if sub is not None else "")
        out.append(KeyDoc(key, _type_name(hint), "" if sub is not None else _yaml_text(default), text))
    return out


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is None or tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "section"
    return str(tp) if typing.get_args(tp) else tp.__name__


def _yaml_text(value) -> str:
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=1 << 20, allow_unicode=True).strip()
    return text.removesuffix("...").strip()  # a scalar document ends with an explicit end marker


def config_help(cls, section: str = "", width: int = 100) -> str:
    """The ``--help-config`` text: one entry per key under ``section`` ('' = all): ``key: type = default``, then
    the description, indented. A ConfigError (with the nearest key) when no key is under ``section``."""
    docs = [d for d in describe_keys(cls) if not section or d.key == section or d.key.startswith(section + ".")]
    if not docs:
        raise ConfigError(f"no config key {section!r}{_nearest(section, schema_keys(cls))}")
    lines = ["config keys (set them in the YAML file, or on the command line as key.sub=value):"]
    for d in docs:
        lines.append(f"  {d.key}: {d.type}" + (f" = {d.default}" if d.default else ""))
        lines += textwrap.wrap(d.help, width, initial_indent="      ", subsequent_indent="      ",
                               break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines)


def add_config_help(parser: argparse.ArgumentParser, cls) -> None:
    """Add ``--help-config [SECTION]`` to a command taking a config of dataclass ``cls``: print the keys and exit."""

    class HelpConfig(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            try:
                print(config_help(cls, values or ""))
            except ConfigError as err:
                parser.error(str(err))
            parser.exit()

    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION", action=HelpConfig,
                        help="list every config key with its type, default and description (or only those under "
                             "SECTION, e.g. train), and exit")
