"""Errors of the offline code that its callers tell apart."""

from __future__ import annotations


class TooLittleData(ValueError):
    """The bank's data cannot support what was asked: no adoption in a training or
    holdout window, or too few to hold customers out and still train.

    A :class:`ValueError`, as before it had a class of its own; callers that tell it
    apart (the CLI) say what to import or which dates to choose, which would mislead for
    any other ``ValueError`` (a bad option, a damaged synthetic bank).
    """
