"""Watermark keys: a secret seed per model, derived per-site keys, durable 0600 key files, and the public commitment."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from scipy.stats import binom

from fedseek.files import atomic_write_bytes
from fedseek.watermark.triggers import DOMAIN, trigger_set

SCHEME_VERSION = "fedseek-wm-v1"
_SEED_BYTES = 32
# Default trigger count: smallest multiple of 100 at which a model that still matches this fraction
# of triggers (a mark partly eroded by fine-tuning) gives p <= _DEFAULT_N_P.
_DEFAULT_N_RETENTION = 0.75
_DEFAULT_N_P = 1e-9


@dataclass(frozen=True)
class WatermarkKey:
    """Secret watermark key: 256-bit seed (hex) plus the public metadata of the trigger set."""

    seed_hex: str = field(repr=False)  # secret: never shown by repr()
    n_triggers: int
    num_classes: int
    input_shape: tuple[int, ...]
    version: str = SCHEME_VERSION
    created: str = ""
    model_id: str = ""
    site_id: str = ""  # non-empty for a per-site fingerprint key derived by site_key()

    def __post_init__(self) -> None:
        """Validate fields and normalise input_shape to a tuple of ints."""
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if self.version != SCHEME_VERSION:
            raise ValueError(f"unsupported watermark scheme version {self.version!r}; this build supports {SCHEME_VERSION!r}")
        try:
            raw = bytes.fromhex(self.seed_hex)
        except (TypeError, ValueError) as exc:
            raise ValueError("watermark seed must be a hex string") from exc
        if len(raw) != _SEED_BYTES:
            raise ValueError(f"watermark seed must be {_SEED_BYTES * 8} bits ({_SEED_BYTES * 2} hex chars), got {len(raw) * 8} bits")
        if int(self.num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if int(self.n_triggers) < 1:
            raise ValueError(f"n_triggers must be >= 1, got {self.n_triggers}")
        if not self.input_shape or any(d < 1 for d in self.input_shape) or len(self.input_shape) > 3:
            raise ValueError(f"input_shape must be (features,), (H, W) or (C, H, W) with positive sizes, got {self.input_shape}")
        object.__setattr__(self, "n_triggers", int(self.n_triggers))
        object.__setattr__(self, "num_classes", int(self.num_classes))

    @property
    def seed(self) -> bytes:
        """The raw 32-byte secret seed."""
        return bytes.fromhex(self.seed_hex)

    @property
    def is_image(self) -> bool:
        """True for image inputs (H, W) or (C, H, W); False for tabular (features,)."""
        return len(self.input_shape) >= 2

    def public_metadata(self) -> dict:
        """Everything except the seed (safe to publish alongside the commitment)."""
        d = asdict(self)
        d.pop("seed_hex")
        d["input_shape"] = list(self.input_shape)
        return d


def default_n_triggers(num_classes: int) -> int:
    """Smallest multiple of 100 at which 75% trigger matches give p <= 1e-9 (100 for K>=3, 200 for K=2)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    n = 100
    while binom.sf(math.ceil(_DEFAULT_N_RETENTION * n) - 1, n, 1.0 / num_classes) > _DEFAULT_N_P:
        n += 100
    return n


def keygen(
    input_shape: Sequence[int], num_classes: int, n_triggers: int | None = None, *, model_id: str = ""
) -> WatermarkKey:
    """Draw a fresh 256-bit key (OS CSPRNG) for a task with inputs of `input_shape` and K classes."""
    n = default_n_triggers(int(num_classes)) if n_triggers is None else int(n_triggers)
    return WatermarkKey(
        seed_hex=secrets.token_hex(_SEED_BYTES),
        n_triggers=n,
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in input_shape),
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        model_id=model_id,
    )


def site_key(key: WatermarkKey, site_id: str) -> WatermarkKey:
    """Derive a per-site fingerprint key: seed = HMAC-SHA256(master seed, site_id); same task metadata."""
    if not site_id:
        raise ValueError("site_id must be non-empty")
    seed = hmac.new(key.seed, DOMAIN + b"|site|" + site_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return WatermarkKey(
        seed_hex=seed,
        n_triggers=key.n_triggers,
        num_classes=key.num_classes,
        input_shape=key.input_shape,
        version=key.version,
        created=key.created,
        model_id=key.model_id,
        site_id=site_id,
    )


def save_key(key: WatermarkKey, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the key as JSON with file mode 0600; refuse to overwrite an existing file unless force."""
    path = Path(path)
    doc = {"fedseek_watermark_key": 1, **asdict(key), "commitment": commitment(key)}
    doc["input_shape"] = list(key.input_shape)
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
    if not force and path.exists():
        raise FileExistsError(f"refusing to overwrite existing watermark key {path} (pass force=True to replace it)")
    try:
        return atomic_write_bytes(path, data, mode=0o600, overwrite=force)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing watermark key {path} (pass force=True to replace it)") from None


def load_key(path: str | os.PathLike) -> WatermarkKey:
    """Read a key written by save_key; checks format, version, seed length and the stored commitment."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"watermark key file not found: {path}")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        warnings.warn(f"watermark key {path} is readable by other users (mode {path.stat().st_mode & 0o777:o}); chmod 600 it", stacklevel=2)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a fedseek watermark key (invalid JSON: {exc})") from exc
    if not isinstance(doc, dict) or doc.get("fedseek_watermark_key") != 1:
        raise ValueError(f"{path} is not a fedseek watermark key (missing 'fedseek_watermark_key': 1)")
    required = ("seed_hex", "n_triggers", "num_classes", "input_shape", "version")
    missing = [k for k in required if k not in doc]
    if missing:
        raise ValueError(f"watermark key {path} is missing field(s): {', '.join(missing)}")
    try:
        key = WatermarkKey(
            seed_hex=doc["seed_hex"],
            n_triggers=doc["n_triggers"],
            num_classes=doc["num_classes"],
            input_shape=tuple(doc["input_shape"]),
            version=doc["version"],
            created=doc.get("created", ""),
            model_id=doc.get("model_id", ""),
            site_id=doc.get("site_id", ""),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid watermark key {path}: {exc}") from exc
    stored = doc.get("commitment")
    if stored is not None and not hmac.compare_digest(str(stored), commitment(key)):
        raise ValueError(f"watermark key {path} does not match its stored commitment (corrupted or edited)")
    return key


def commitment(key: WatermarkKey) -> str:
    """SHA-256 hex over the seed, the trigger-set bytes and the key metadata (publishable)."""
    x, y = trigger_set(key)
    meta = json.dumps(key.public_metadata(), sort_keys=True, separators=(",", ":")).encode("utf-8")
    h = hashlib.sha256()
    for part in (DOMAIN + b"|commit", key.seed, x.numpy().astype("<f4").tobytes(), y.numpy().astype("<i8").tobytes(), meta):
        h.update(len(part).to_bytes(8, "big"))  # length-prefixed: no ambiguity between parts
        h.update(part)
    return h.hexdigest()
