"""The fedseek Flower App staged into a minimal directory, so submitting a run never walks the repository.

`flwr run APP` (and fedseek's in-process submit, which calls the same `build_fab_from_disk`)
lists EVERY file under APP before applying `fab-include`: from the repository root that is
`.venv` and `runs/` too (~4 s per run, measured). The FAB itself only ever holds pyproject.toml
and the files `[tool.flwr.app] fab-include` names (server/, clients/ and fedseek's .py files),
so those are copied, with fedseek's package data, into a directory named by the hash of their
contents under the user's cache, and reused while nothing changed. The FAB built from it is
byte-for-byte the one built from the repository root (tests/test_cli.py checks the file list).

Flower's FAB keeps only source-like files (.py, .toml, .md, .yaml, .json...), so the package
data staged here (report templates) never reaches the ServerApp/ClientApp: they import the
FAB's copy of fedseek (Flower puts the extracted app first on sys.path) and must not need it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import time
import tomllib
from pathlib import Path

import fedseek

STAGE_PREFIX = "fedseek-app-"
KEEP_UNUSED_S = 7 * 24 * 3600  # stages not used for a week are removed


class AppNotFound(RuntimeError):
    """fedseek is not installed from a source checkout (the Flower App's server/ and clients/ are missing)."""


def source_root() -> Path:
    """The checkout the running fedseek comes from: pyproject.toml with [tool.flwr.app], server/ and clients/."""
    root = Path(fedseek.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists() or not (root / "server" / "app.py").exists():
        raise AppNotFound(f"the fedseek Flower App was not found at {root}: install fedseek from a source checkout (pip install -e .)")
    return root


def _patterns(root: Path) -> tuple[list[str], list[str]]:
    """(fab-include patterns, package-data patterns under fedseek/) from the checkout's pyproject.toml."""
    with open(root / "pyproject.toml", "rb") as fh:
        config = tomllib.load(fh)
    include = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not include:
        raise AppNotFound(f"{root / 'pyproject.toml'} has no [tool.flwr.app] fab-include: cannot tell which files make the app")
    data = config.get("tool", {}).get("setuptools", {}).get("package-data", {}).get("fedseek", [])
    return list(include), [f"fedseek/{p}" for p in data]


def app_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every file the staged app holds (pyproject.toml, .gitignore, fab-include, package data)."""
    from flwr.cli.utils import build_pathspec

    include, data = _patterns(root)
    spec = build_pathspec([*include, *data])
    files = {name: root / name for name in ("pyproject.toml", ".gitignore") if (root / name).is_file()}
    for top in sorted({p.lstrip("/").split("/", 1)[0] for p in [*include, *data]}):
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                if not path.is_symlink() and spec.match_file(rel):
                    files[rel] = path
    return files


def _digest(files: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        data = files[rel].read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def cache_root() -> Path:
    """Where stages live: $FEDSEEK_CACHE_DIR, else $XDG_CACHE_HOME/fedseek, else ~/.cache/fedseek (a temp dir if unwritable)."""
    env = os.environ.get("FEDSEEK_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedseek"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"fedseek-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    return fallback


def _prune(base: Path, keep: Path) -> None:
    """Remove stages of older sources that were not used for a week (best effort)."""
    now = time.time()
    for old in base.glob(f"{STAGE_PREFIX}*"):
        try:
            if old != keep and now - old.stat().st_mtime > KEEP_UNUSED_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue


def staged_app_dir(base: Path | None = None) -> Path:
    """The Flower App staged under the cache (created on first use, reused while the sources are unchanged)."""
    root = source_root()
    files = app_files(root)
    base = base or cache_root()
    target = base / f"{STAGE_PREFIX}{_digest(files)[:20]}"
    if target.is_dir():
        os.utime(target)
        return target
    tmp = base / f".{target.name}.{secrets.token_hex(4)}.tmp"
    for rel, src in files.items():
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    try:
        os.rename(tmp, target)  # atomic: concurrent launches either create it or find it complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    _prune(base, target)
    return target
