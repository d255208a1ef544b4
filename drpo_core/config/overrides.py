"""Reading config trees: YAML 1.2 scalars and ``--set key.path=value`` overrides (list items by index).

``trainer.mixed_precision=no`` stays the string "no" (YAML 1.1 would make it False, which no enum
accepts); pydantic still reads "no"/"off" as False where the field is a bool. ``rewards.0.weight=2``
changes one item of a list; a list the files did not set starts from the config's defaults.
"""

from __future__ import annotations

import copy
import re

import yaml


class ConfigError(ValueError):
    """A user error in the configuration; the message is one line naming the field and why."""


class Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 scalars: only true/false are booleans (``mixed_precision: no`` stays the string "no";
    pydantic still reads "no"/"off" as False for a bool field), and ``1e-3`` is a float, not a string."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    """One YAML document with YAML 1.2 scalars, through a SafeLoader (no object construction)."""
    loader = Yaml12Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _default_at(defaults: dict | None, keys: list[str]):
    node = defaults
    for key in keys:
        node = node[int(key)] if isinstance(node, list) else node.get(key) if isinstance(node, dict) else None
    return copy.deepcopy(node)


def _apply_override(tree: dict, assignment: str, defaults: dict | None = None) -> dict:
    """``a.b.c=value``: value parsed as YAML 1.2; a numeric key indexes a list (``rewards.0.weight=2``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: empty key in {path!r}")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML: {str(e).splitlines()[0]}") from None
    tree = copy.deepcopy(tree)
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node[int(key)] if isinstance(node, list) else node.get(key)
        if child is None and isinstance(_default_at(defaults, keys[:depth + 1]), list):  # a list the files did not set
            child = _default_at(defaults, keys[:depth + 1])
        if not isinstance(child, (dict, list)):
            child = {}
        if isinstance(node, list):
            node[int(key)] = child
        else:
            node[key] = child
        node = child
        if isinstance(node, list):
            index = keys[depth + 1]
            if not index.isdigit() or int(index) >= len(node):
                raise ConfigError(f"--set {assignment!r}: {'.'.join(keys[:depth + 1])} is a list of {len(node)} item(s); "
                                  f"{index!r} is not an index of it")
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = _merge(node[int(last)], value) if isinstance(value, dict) and isinstance(node[int(last)], dict) else value
    else:
        node[last] = _merge(node[last], value) if isinstance(value, dict) and isinstance(node.get(last), dict) else value
    return tree


