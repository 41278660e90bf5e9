"""Tensor names: one canonical form for state_dict keys, whether or not Opacus wraps the module."""

from __future__ import annotations

WRAP_PREFIX = "_module."  # Opacus' GradSampleModule prefixes every parameter name with it


def canonical_name(name: str) -> str:
    """Strip Opacus' ``_module.`` wrapper prefixes so wrapped and plain names match."""
    while name.startswith(WRAP_PREFIX):
        name = name[len(WRAP_PREFIX) :]
    return name
