"""Errors of the offline code that its callers tell apart."""

from __future__ import annotations


class TooLittleData(ValueError):
    """The bank's data cannot support what was asked: no adoption in a training or
    holdout window, or too few to hold customers out and still train.

    A :class:`ValueError`, so code that caught ``ValueError`` before this class existed
    still catches it. Callers that tell it apart (the CLI) say what to import or which
    dates to choose, advice that would mislead for any other ``ValueError`` (a bad
    option, a damaged synthetic bank).
    """
