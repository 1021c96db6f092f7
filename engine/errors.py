"""The errors a user can cause, in one module that everything else imports (and that imports nothing).

Each carries a message naming the culprit (the recipe field, the op, the file) and what would be valid.
"""
from __future__ import annotations


class RecipeError(ValueError):
    """A recipe or override is invalid. The message names the field."""


class KernelSelectionError(RecipeError):
    """An op or backend name is unknown, or a backend cannot serve an op here."""
