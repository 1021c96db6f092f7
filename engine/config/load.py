"""Reading a recipe: TOML tables and ``--section.key=value`` overrides, coerced to the fields' types, the
preset first; and writing the resolved recipe back as TOML."""
from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ..errors import RecipeError
from ..ops import table
from .model import PRESETS
from .sections import Recipe
from .validate import validate


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(where: str, value: Any, typ: Any, from_cli: bool) -> Any:
    """Convert ``value`` to ``typ`` or raise a RecipeError naming ``where``."""

    def bad() -> RecipeError:
        shown = value if from_cli else repr(value)
        return RecipeError(f"{where}: expected {_type_name(typ)}, got {shown}")

    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad()
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad()
    if get_origin(typ) is Literal:
        if isinstance(value, str) and value in get_args(typ):
            return value
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(get_args(typ))}")
    if typing.get_origin(typ) is tuple:
        args = typing.get_args(typ)
        items = value.split(",") if from_cli and isinstance(value, str) else value
        if len(args) == 2 and args[1] is Ellipsis:  # any length, one item type
            if not isinstance(items, (list, tuple)):
                raise bad()
            return tuple(_coerce(where, v, args[0], from_cli) for v in items if not (from_cli and v == ""))
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise bad()
        return tuple(_coerce(where, v, t, from_cli) for v, t in zip(items, args))
    raise TypeError(f"unsupported recipe field type {typ!r} at {where}")


def _type_name(typ: Any) -> str:
    if get_origin(typ) is Literal:
        return "one of " + ", ".join(get_args(typ))
    if get_origin(typ) is tuple and get_args(typ)[1:] == (Ellipsis,):
        return f"a list of {_type_name(get_args(typ)[0])}s"
    if get_origin(typ) is tuple:
        return "a list of " + ", ".join(_type_name(t) for t in typing.get_args(typ))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


def _apply(recipe: Recipe, section: str, key: str, value: Any, from_cli: bool) -> None:
    sections = {f.name for f in dataclasses.fields(Recipe)}
    if section not in sections:
        raise RecipeError(f"unknown recipe section [{section}]; valid sections: {', '.join(sorted(sections))}")
    sub = getattr(recipe, section)
    types = _field_types(type(sub))
    if section == "kernels" and key in sub.ops:  # one key per op of the op table
        sub.ops[key] = _coerce(f"kernels.{key}", value, str, from_cli)
        table.check_backend_name(key, sub.ops[key])
        return
    if section == "kernels":
        types = {**sub.ops, **{k: t for k, t in types.items() if k != "ops"}}
    if key not in types:
        raise RecipeError(f"unknown key {section}.{key}; valid keys of [{section}]: {', '.join(types)}")
    setattr(sub, key, _coerce(f"{section}.{key}", value, types[key], from_cli))


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """Turn ``--section.key=value`` (or ``--section.key value``) arguments into triples."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise RecipeError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise RecipeError(f"override --{name} needs a value (--{name}=VALUE)")
            value = args[i + 1]
            i += 1
        section, _, key = name.partition(".")
        out.append((section, key.replace("-", "_"), value))
        i += 1
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply its preset and the command-line overrides, validate, return it."""
    table: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: not valid TOML: {e}") from None
    cli = parse_overrides(list(overrides))
    recipe = Recipe()
    # The preset goes first so that the recipe's own values and the overrides win over it.
    preset = next((v for s, k, v in cli if (s, k) == ("model", "preset")), None)
    if preset is None:
        preset = table.get("model", {}).get("preset", "") if isinstance(table.get("model"), dict) else ""
    if preset:
        if preset not in PRESETS:
            raise RecipeError(f"model.preset: unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            _apply(recipe, "model", key, value, from_cli=False)
    for section, values in table.items():
        if not isinstance(values, dict):
            raise RecipeError(f"top-level key {section!r} must be a [section] table")
        for key, value in values.items():
            _apply(recipe, section, key, value, from_cli=False)
    for section, key, value in cli:
        _apply(recipe, section, key, value, from_cli=True)
    validate(recipe)
    return recipe


def dump_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, readable back by :func:`load_recipe`."""
    lines = []
    for section, values in recipe.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, once DEL (allowed raw in JSON, not in TOML) is escaped too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
