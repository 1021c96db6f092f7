"""Command-line parsing shared by ``bench ops``, ``bench train`` and ``kernels check``: the option errors, an
argparse that raises them, comma lists."""
from __future__ import annotations

import argparse
from typing import Sequence

from ..config import RecipeError


class BenchError(RecipeError):
    """A benchmark option is invalid. The message names the option."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`BenchError` instead of exiting, so callers and tests see the error."""

    def error(self, message: str):
        raise BenchError(f"{message} (see `{self.prog} --help`)")


def comma_list(text: str, option: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    if not all(items):
        raise BenchError(f"{option}: empty name in {text!r}")
    return list(dict.fromkeys(items))


class CheckError(BenchError):
    """The check cannot run as asked (a bad option, or the interpreter cannot be switched on)."""


def known_names(text: str, option: str, valid: Sequence[str]) -> list[str]:
    items = list(dict.fromkeys(s.strip() for s in text.split(",")))
    for item in items:
        if item not in valid:
            raise CheckError(f"{option}: unknown name {item!r}; valid: {', '.join(valid)}")
    return items
