"""YAML files that may start from another: `base: other.yaml` (a path relative to the file), then only what differs.

Shared by training configs (configs/train/) and tokenizer recipes (tokenizers/). Mappings merge key by key at every
depth; anything else (a list, a number) replaces the base's value.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def load_yaml_with_base(
    path: str | Path,
    what: str,
    error: type[Exception] = ValueError,
    missing: type[Exception] | None = None,
    check: Callable[[dict[str, Any], Path], None] | None = None,
) -> dict[str, Any]:
    """The mapping of a YAML file after its `base:` chain, without the `base` key.

    what names the file kind in messages ("train config"); error is raised for bad YAML, a non-mapping and a
    cycle of bases, missing (default: error) for a file that does not exist; check(values, path) validates
    each file's own mapping before the merge, so a typo is reported against the file that has it."""
    return _values(Path(path), what, error, missing or error, check, ())


def _values(path: Path, what, error, missing, check, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise missing(f"{what} not found: {path}" + (f" (the base of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise error(f"{path}: `base` files form a cycle: {' -> '.join(map(str, (*seen, path)))}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML: {e}") from e
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise error(f"{path}: a {what} is a mapping, got {type(values).__name__}")
    values = dict(values)
    base = values.pop("base", None)
    if check is not None:
        check(values, path)
    if base is None:
        return values
    if not isinstance(base, str):
        raise error(f"{path}: base must be the path of another {what}, got {base!r}")
    return _merged(_values(path.parent / base, what, error, missing, check, (*seen, path.resolve())), values)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both else value
    return merged
