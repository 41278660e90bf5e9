"""Reading YAML into typed objects: one ConfigError line naming the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fedseek.names import SITE_NAME_PATTERN


class ConfigError(ValueError):
    """A configuration problem, reported as one line (file, key, what is allowed)."""


class StrictSpec(BaseModel):
    """Base of every config model: an unknown key is an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=False)


T = TypeVar("T", bound=BaseModel)


def _format_error(path: Path, err: ValidationError) -> str:
    """The first validation error as one line: file, dotted key, message, the value given, how many more."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    got_s = "" if first["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{path}: key '{key}': {msg}{got_s}{more}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning I/O and syntax problems into one-line ConfigErrors."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def parse(model: type[T], raw: dict[str, Any], source: str | Path = "<config>") -> T:
    """Validate a mapping into `model`, raising a one-line ConfigError on failure."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(Path(source), err)) from None


_ADDRESS = r"^(\[[0-9A-Fa-f:.]+\]|[^:\s/\[\]]+):\d{1,5}$"


def check_site_name(value: str) -> str:
    """A site name usable as a file name and a Flower node name (what `fedseek certs add-site` accepts)."""
    import re

    if not re.match(SITE_NAME_PATTERN, value):
        raise ValueError("use 1-63 letters, digits, '-' or '_', starting with a letter or digit")
    return value


def check_address(value: str) -> str:
    """host:port without a scheme (Flower's --superlink form)."""
    import re

    if not re.match(_ADDRESS, value) or not 1 <= int(value.rsplit(":", 1)[1]) <= 65535:
        raise ValueError("must be host:port without a scheme, e.g. coord.example.org:9092")
    return value


def resolve_path(base: Path, value: str | None) -> str | None:
    """`value` made absolute against `base` (the YAML file's directory); `~` expanded; None stays None."""
    if value is None or value == "":
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())
