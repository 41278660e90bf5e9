"""Hostile reply generators: each takes an honest site's reply content and makes it hostile in place.

Shared by the fast suite (tests/test_hostile_sites.py, against the fake Grid) and the deployed one
(tests/test_deploy_hostile.py, where tests/hostile_site/sitecustomize.py applies them inside a
real site's ClientApp process). Test code only: nothing here is part of fedseek.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedseek.wire.blob import pack_blob, unpack_blob
from fedseek.wire.records import SITE, site_record


def _blob(content: RecordDict) -> tuple[dict[str, np.ndarray], dict]:
    return unpack_blob(content.array_records["update"]["blob"].numpy())


def _set_blob(content: RecordDict, raw: np.ndarray) -> None:
    content["update"] = ArrayRecord({"blob": Array(np.ascontiguousarray(raw))})


def nested_json(content: RecordDict) -> None:
    """The blob header is `[` x 100,000 (once a RecursionError in the ServerApp)."""
    header = zlib.compress(b"[" * 100_000, 9)
    _set_blob(content, np.frombuffer(b"FSB1" + struct.pack("<I", len(header)) + header, np.uint8).copy())


def num_examples(value: float) -> Callable[[RecordDict], None]:
    """The reply claims `value` examples (written under Flower's type check, as a hand-made protobuf could)."""

    def mutate(content: RecordDict) -> None:
        rec = MetricRecord(dict(content.metric_records["metrics"]))
        rec._data["num-examples"] = value
        content["metrics"] = rec

    return mutate


def scaled(factor: float, *, absolute: bool = False) -> Callable[[RecordDict], None]:
    """Every update value multiplied by `factor` (or, absolute, set to it)."""

    def mutate(content: RecordDict) -> None:
        arrays, meta = _blob(content)
        bad = {k: (np.full_like(v, factor) if absolute else v * np.float32(factor)) if k.endswith(".val") else v for k, v in arrays.items()}
        _set_blob(content, pack_blob(bad, meta))

    return mutate


def wrong_shapes(content: RecordDict) -> None:
    """One tensor claims an extra row (shape, count and values consistent with each other, not with the model)."""
    arrays, meta = _blob(content)
    name = next(k[: -len(".shape")] for k, v in sorted(meta.items()) if k.endswith(".shape") and len(json.loads(v)) == 2)
    rows, cols = json.loads(meta[f"{name}.shape"])
    meta[f"{name}.shape"], meta[f"{name}.count"] = json.dumps([rows + 1, cols]), (rows + 1) * cols
    arrays[f"{name}.val"] = np.concatenate([arrays[f"{name}.val"], np.zeros(cols, np.float32)])
    _set_blob(content, pack_blob(arrays, meta))



def names_site(other: str) -> Callable[[RecordDict], None]:
    """The (otherwise honest) reply says it comes from site `other`."""

    def mutate(content: RecordDict) -> None:
        content[SITE] = site_record(other)

    return mutate
