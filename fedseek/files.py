"""Durable file writes: the one atomic writer every layer uses (run outputs, ledger, keys, certificates, pidfiles).

A crash or power loss leaves either the old file or the new one, never a torn one: the data
goes to a temp file in the same directory (created with its final mode, never wider), is
fsync'd, then renamed over the target (or hard-linked, when the target must not exist yet),
and the directory is fsync'd so the rename itself survives.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` exclusively with exactly `mode` (whatever the umask) and write `data` durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically with file mode `mode`.

    overwrite=False creates the file only if it does not exist yet (FileExistsError otherwise),
    atomically: two writers racing cannot both succeed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    _write_new(tmp, data, mode)
    try:
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise FileExistsError(f"refusing to overwrite existing file {target}") from None
            except OSError:  # filesystem without hard links: exclusive create of the final path
                _write_new(target, data, mode)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)
    return target


def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, tuples as lists, NaN/Inf as null (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, mode: int = 0o600, overwrite: bool = True) -> Path:
    """Write `obj` as indented JSON atomically (NaN/Inf become null)."""
    text = json.dumps(jsonable(obj), indent=2) + "\n"
    return atomic_write_bytes(path, text.encode(), mode=mode, overwrite=overwrite)


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line and fsync it, so a reader never sees a partial line after a crash."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())
