"""Coordinator log lines through Flower's logger too, so `flwr log` and the launcher show them."""

from __future__ import annotations

from logging import INFO
from typing import Any


def flwr_log(msg: str, *args: Any) -> None:
    """Log one "[fedseek] ..." line at INFO through Flower's logger."""
    from flwr.common.logger import log as flog

    flog(INFO, "[fedseek] " + msg, *args)
