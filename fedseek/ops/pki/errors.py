"""The PKI's one exception: every failure reaches the operator as a single line."""

from __future__ import annotations


class PkiError(Exception):
    """A PKI operation failed; the message is one line meant for the operator."""
