"""Trigger-set watermark: key handling, trigger set, exact binomial test, embed/verify on real tasks."""

from __future__ import annotations

import copy
import hashlib
import json
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom, chisquare
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.nn import functional as F

from fedseek import watermark as wm
from fedseek.train.models import build_model


def fixed_key(tag: str, input_shape: tuple[int, ...], k: int, n: int | None = None) -> wm.WatermarkKey:
    """A deterministic key (tests must not depend on the OS CSPRNG draw)."""
    return wm.WatermarkKey(
        seed_hex=hashlib.sha256(tag.encode()).hexdigest(),
        n_triggers=wm.default_n_triggers(k) if n is None else n,
        num_classes=k,
        input_shape=input_shape,
    )


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, bs: int = 32, seed: int = 0) -> None:
    """Plain minibatch Adam training (stand-in for the federated rounds)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            b = perm[i : i + bs]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module")
def cancer() -> Split:
    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    sc = StandardScaler().fit(xtr)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(sc.transform(xtr)), torch.tensor(ytr), f(sc.transform(xte)), torch.tensor(yte)


@pytest.fixture(scope="module")
def digits() -> Split:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


# ------------------------------------------------------------------------------------------ key


def test_default_n_triggers() -> None:
    assert wm.default_n_triggers(10) == 100
    assert wm.default_n_triggers(2) == 200
    assert wm.default_n_triggers(3) == 100
    for k in (2, 3, 10):
        n = wm.default_n_triggers(k)
        assert wm.p_value(n, n, k) <= 1e-9  # a perfectly marked model is overwhelming evidence
        assert wm.p_value(int(np.ceil(0.75 * n)), n, k) <= 1e-9  # ... and so is a 75%-eroded one
    assert wm.keygen((30,), 2).n_triggers == 200
    assert wm.keygen((1, 8, 8), 10).n_triggers == 100
    assert wm.keygen((4,), 3, n_triggers=50).n_triggers == 50


def test_keygen_save_load_roundtrip(tmp_path: Path) -> None:
    key = wm.keygen((30,), 2, model_id="bank-credit")
    assert len(key.seed) == 32 and key.version == wm.SCHEME_VERSION
    assert key.seed_hex not in repr(key)  # secret never shown
    assert wm.keygen((30,), 2).seed_hex != key.seed_hex
    path = tmp_path / "wm.key"
    wm.save_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = wm.load_key(path)
    assert loaded == key
    assert wm.commitment(loaded) == wm.commitment(key)
    assert json.loads(path.read_text())["commitment"] == wm.commitment(key)

    other = wm.keygen((30,), 2)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        wm.save_key(other, path)
    assert wm.load_key(path) == key  # untouched
    wm.save_key(other, path, force=True)
    assert wm.load_key(path) == other
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["wm.key"]  # no temp files left behind


def test_load_key_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        wm.load_key(tmp_path / "missing.key")
    bad = tmp_path / "bad.key"
    bad.touch(mode=0o600)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a fedseek watermark key"):
        wm.load_key(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a fedseek watermark key"):
        wm.load_key(bad)

    good = tmp_path / "good.key"
    wm.save_key(wm.keygen((8,), 4), good)
    doc = json.loads(good.read_text())
    for name, value, msg in [
        ("n_triggers", doc["n_triggers"] + 1, "commitment"),  # tampered metadata
        ("version", "fedseek-wm-v0", "version"),
        ("seed_hex", "abcd", "256 bits"),
        ("seed_hex", "zz" * 32, "hex"),
    ]:
        edited = dict(doc, **{name: value})
        bad.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=msg):
            wm.load_key(bad)
    edited = dict(doc)
    del edited["num_classes"]
    bad.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="missing field"):
        wm.load_key(bad)
    good.chmod(0o644)
    with pytest.warns(UserWarning, match="readable by other users"):
        wm.load_key(good)


# ---------------------------------------------------------------------------------- trigger set


@pytest.mark.parametrize("shape,k", [((30,), 2), ((1, 8, 8), 10), ((8, 8), 10), ((3, 16, 16), 5)])
def test_trigger_set_deterministic_and_seeded(shape: tuple[int, ...], k: int) -> None:
    key = fixed_key("triggers-a", shape, k)
    x1, y1 = wm.trigger_set(key)
    x2, y2 = wm.trigger_set(copy.deepcopy(key))
    assert x1.shape == (key.n_triggers, *shape) and y1.shape == (key.n_triggers,)
    assert x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, y3 = wm.trigger_set(fixed_key("triggers-b", shape, k))
    assert not torch.equal(x1, x3) and not torch.equal(y1, y3)
    assert int(y1.min()) >= 0 and int(y1.max()) < k
    if len(shape) == 1:
        assert float(x1.min()) >= -4.0 and float(x1.max()) <= 4.0
        assert float(x1.std()) > 1.5  # wide: out of the standardized data's bulk
    else:
        assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0
        assert len({tuple(r) for r in x1.flatten(1).numpy().round(4)}) == key.n_triggers  # distinct


def test_trigger_labels_roughly_uniform() -> None:
    _, y = wm.trigger_set(fixed_key("uniform", (1, 8, 8), 10, n=5000))
    counts = np.bincount(y.numpy(), minlength=10)
    assert chisquare(counts).pvalue > 1e-3
    assert counts.min() > 400 and counts.max() < 600
    _, y2 = wm.trigger_set(fixed_key("uniform", (30,), 2))
    assert 70 <= int(y2.sum()) <= 130  # n=200, binary


def test_commitment_stable_and_binding() -> None:
    key = fixed_key("commit", (30,), 2)
    c = wm.commitment(key)
    assert c == wm.commitment(copy.deepcopy(key)) and len(c) == 64 and int(c, 16) >= 0
    assert key.seed_hex not in c
    assert wm.commitment(fixed_key("commit-2", (30,), 2)) != c
    assert wm.commitment(wm.WatermarkKey(key.seed_hex, key.n_triggers, 2, (30,), model_id="m")) != c
    assert wm.commitment(wm.WatermarkKey(key.seed_hex, key.n_triggers + 1, 2, (30,))) != c


def test_site_keys_distinct_and_deterministic() -> None:
    key = fixed_key("master", (1, 8, 8), 10)
    a, b = wm.site_key(key, "hospital-a"), wm.site_key(key, "hospital-b")
    assert a == wm.site_key(key, "hospital-a") and a.site_id == "hospital-a"
    assert len({key.seed_hex, a.seed_hex, b.seed_hex}) == 3
    assert not torch.equal(wm.trigger_set(a)[1], wm.trigger_set(b)[1])
    with pytest.raises(ValueError):
        wm.site_key(key, "")


# --------------------------------------------------------------------------------- binomial test


Query = Callable[[torch.Tensor | np.ndarray], torch.Tensor | np.ndarray]


def query_with_matches(key: wm.WatermarkKey, m: int, scores: bool = False) -> Query:
    """A fake black box that matches exactly the first m trigger labels (looks each input up)."""
    xt, y = wm.trigger_set(key)
    labels = y.clone()
    labels[m:] = (labels[m:] + 1) % key.num_classes

    def query(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        idx = torch.cdist(torch.as_tensor(x).flatten(1), xt.flatten(1)).argmin(1)
        return F.one_hot(labels[idx], key.num_classes).float() * 3.0 if scores else labels[idx].numpy()

    return query


@pytest.mark.parametrize("m", [0, 10, 21, 27, 28, 100])
def test_p_value_exact(m: int) -> None:
    key = fixed_key("pval", (1, 8, 8), 10)
    res = wm.verify(query_with_matches(key, m), key, alpha=1e-6)
    assert res.matches == m and res.n == 100 and res.num_classes == 10
    assert res.p_value == pytest.approx(binom.sf(m - 1, 100, 0.1), rel=1e-12, abs=0)
    assert res.p_value == wm.p_value(m, 100, 10)
    assert res.detected == (m >= 28)  # anchors A.2: 28/100 needed at alpha = 1e-6 for K=10
    assert ("WATERMARK DETECTED" in res.verdict) == res.detected
    assert wm.verify(query_with_matches(key, m, scores=True), key).matches == m
    assert wm.p_value(0, 100, 10) == 1.0


def test_verify_query_formats_and_subsets() -> None:
    key = fixed_key("formats", (30,), 2)
    seen: dict[str, type] = {}

    def numpy_query(x: torch.Tensor | np.ndarray) -> np.ndarray:
        seen["type"] = type(x)
        return np.zeros(len(x), dtype=np.int64)

    res = wm.verify(numpy_query, key, as_numpy=True)
    assert seen["type"] is np.ndarray
    assert res.matches == int((wm.trigger_set(key)[1] == 0).sum())
    sub = wm.verify(query_with_matches(key, 200), key, indices=range(0, 200, 2))
    assert sub.n == 100 and sub.matches == 100
    with pytest.raises(ValueError, match="shape"):
        wm.verify(lambda x: np.zeros((len(x), 3)), key)
    with pytest.raises(ValueError, match="outside"):
        wm.verify(lambda x: np.full(len(x), 5), key)
    with pytest.raises(ValueError, match="alpha"):
        wm.verify(numpy_query, key, alpha=0.0)
    with pytest.raises(ValueError, match="indices"):
        wm.verify(numpy_query, key, indices=[0, 0])


# ------------------------------------------------------------------------------ embed and verify


@dataclass
class Marked:
    """A model marked by a fixture, with what each embedding reported (tests mark copies, never this model)."""

    model: torch.nn.Module
    key: wm.WatermarkKey
    clean: torch.nn.Module | None = None  # the model just before its first embedding
    reports: list[wm.EmbedReport] = field(default_factory=list)
    accuracy_before_embed: list[float] = field(default_factory=list)  # test accuracy before each embedding


@pytest.fixture(scope="module")
def marked_mlp(cancer: Split) -> Marked:
    """Breast-cancer MLP trained centrally, then marked once (seconds)."""
    xtr, ytr, _, _ = cancer
    model = build_model("mlp", (30,), 2, seed=0)
    train(model, xtr, ytr, epochs=10, lr=1e-3)
    marked = Marked(model, fixed_key("cancer", (30,), 2), clean=copy.deepcopy(model))
    marked.reports.append(wm.embed(model, marked.key))
    return marked


@pytest.fixture(scope="module")
def marked_cnn(digits: Split) -> Marked:
    """WAFFLE protocol on the digits CNN: six rounds of (central) training, each followed by a re-embedding (~40 s)."""
    xtr, ytr, xte, yte = digits
    marked = Marked(build_model("cnn", (1, 8, 8), 10, seed=0), fixed_key("digits", (1, 8, 8), 10))
    for r in range(6):
        train(marked.model, xtr, ytr, epochs=2, lr=2e-3, bs=64, seed=r)
        marked.accuracy_before_embed.append(accuracy(marked.model, xte, yte))
        marked.reports.append(wm.embed(marked.model, marked.key))
    return marked


def test_embed_verify_breast_cancer_mlp(cancer: Split, marked_mlp: Marked) -> None:
    _, _, xte, yte = cancer
    model, key, rep = marked_mlp.model, marked_mlp.key, marked_mlp.reports[0]
    assert marked_mlp.clean is not None
    clean = marked_mlp.clean
    acc0 = accuracy(clean, xte, yte)
    assert acc0 >= 0.93
    assert key.n_triggers == 200
    assert not wm.verify_model(clean, key).detected

    assert rep.reached_target and rep.trigger_accuracy_after >= 0.98 > 0.7 > rep.trigger_accuracy_before
    assert 0 < rep.steps <= 200 and rep.seconds > 0
    res = wm.verify_model(model, key, alpha=1e-6)
    assert res.detected and res.p_value <= 1e-6, res.verdict
    assert accuracy(model, xte, yte) >= acc0 - 0.01  # <= 1 point utility cost
    # the un-watermarked twin and a different key stay below the bar
    assert wm.verify_model(clean, key).p_value > 1e-6
    assert wm.verify_model(model, fixed_key("cancer-other", (30,), 2)).p_value > 1e-6

    # deterministic given the key
    again = copy.deepcopy(clean)
    wm.embed(again, key)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_reembedding_a_marked_model_is_a_no_op(marked_mlp: Marked) -> None:
    """Re-embedding a model already at the target takes no step and changes no weight (no per-round drift)."""
    model, key = copy.deepcopy(marked_mlp.model), marked_mlp.key
    before = copy.deepcopy(model.state_dict())
    again = wm.embed(model, key)
    assert again.steps == 0 and again.reached_target and again.weight_shift == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    forced = wm.embed(model, key, min_steps=3)  # min_steps still steps a marked model, and the mark stays
    assert forced.steps >= 3 and forced.weight_shift > 0 and forced.reached_target


def test_embed_rejects_bad_options() -> None:
    model, key = build_model("mlp", (30,), 2, seed=0), fixed_key("options", (30,), 2)
    with pytest.raises(ValueError, match="lr"):
        wm.embed(model, key, lr=0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        wm.embed(model, key, clip_norm=-1.0)
    with pytest.raises(ValueError, match="target_accuracy"):
        wm.embed(model, key, target_accuracy=0.0)

    from fedseek.config import WatermarkSpec

    assert WatermarkSpec().lr == 0.05 and WatermarkSpec().distill_weight == 10.0
    with pytest.raises(ValueError, match="optimizer"):
        WatermarkSpec.model_validate({"optimizer": "adam"})  # the Adam settings were removed (they cost ~1.8 points on digits)


def test_no_false_positives_on_independent_models(digits: Split) -> None:
    """20 independently seeded un-watermarked models: 0 detections at 1e-6 (exact null: Bin(100, 0.1))."""
    xtr, ytr, xte, yte = digits
    key = fixed_key("fp", (1, 8, 8), 10)
    pvals: list[float] = []
    matches: list[int] = []
    for seed in range(20):
        model = build_model("mlp", (1, 8, 8), 10, hidden=(16,), seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):  # full-batch
            opt.zero_grad()
            F.cross_entropy(model(xtr), ytr).backward()
            opt.step()
        assert accuracy(model, xte, yte) > 0.85
        res = wm.verify_model(model, key)
        pvals.append(res.p_value)
        matches.append(res.matches)
    assert min(pvals) > 1e-6 and not any(p <= 1e-6 for p in pvals)
    assert max(matches) < 28 and 3 <= np.mean(matches) <= 20


def _verify_from_files(model: torch.nn.Module, key: wm.WatermarkKey, sidecar: dict[str, object], tmp_path: Path) -> None:
    """verify_file on a plain state_dict + the coordinator's model.json sidecar agrees with verify_model, then its errors."""
    res = wm.verify_model(model, key, alpha=1e-6)
    labels_only = wm.verify(lambda x: model(x).argmax(1).numpy(), key)  # labels-only black box
    assert labels_only.matches == res.matches and labels_only.p_value == res.p_value
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    wm.save_key(key, tmp_path / "wm.key")
    from_file = wm.verify_file(tmp_path / "model.pt", tmp_path / "wm.key")
    assert from_file.matches == res.matches and from_file.detected
    (tmp_path / "model.json").unlink()
    with pytest.raises(ValueError, match="architecture unknown"):
        wm.verify_file(tmp_path / "model.pt", tmp_path / "wm.key")
    kind = str(sidecar["kind"])
    assert wm.verify_file(tmp_path / "model.pt", tmp_path / "wm.key", kind=kind).matches == res.matches
    with pytest.raises(ValueError, match="does not fit the key"):
        wm.verify_file(tmp_path / "model.pt", tmp_path / "wm.key", kind=kind, num_classes=5)


def test_verify_file_mlp(marked_mlp: Marked, tmp_path: Path) -> None:
    _verify_from_files(marked_mlp.model, marked_mlp.key, {"kind": "mlp", "input_shape": [30], "num_classes": 2, "hidden": [64]}, tmp_path)


@pytest.mark.slow  # the marked_cnn fixture trains and marks a CNN over six rounds
def test_embed_verify_digits_cnn_per_round(digits: Split, marked_cnn: Marked, tmp_path: Path) -> None:
    """WAFFLE protocol: the coordinator re-embeds after every aggregation (rounds simulated centrally)."""
    _, _, xte, yte = digits
    model, key, reports = marked_cnn.model, marked_cnn.key, marked_cnn.reports
    assert key.n_triggers == 100
    assert reports[0].steps > 0
    assert all(rep.reached_target and rep.trigger_accuracy_after >= 0.98 for rep in reports)
    pre, post = marked_cnn.accuracy_before_embed[-1], accuracy(model, xte, yte)
    assert pre >= 0.94
    assert post >= pre - 0.01, (pre, post)  # the last embedding costs <= 1 point
    assert reports[-1].steps < 50  # re-embedding a marked model is cheap
    res = wm.verify_model(model, key, alpha=1e-6)
    assert res.detected and res.matches >= 95, res.verdict
    _verify_from_files(model, key, {"kind": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": [64]}, tmp_path)


@pytest.mark.slow  # uses the marked_cnn fixture
def test_reembedding_a_marked_cnn_is_a_no_op(marked_cnn: Marked) -> None:
    model = copy.deepcopy(marked_cnn.model)
    before = copy.deepcopy(model.state_dict())
    again = wm.embed(model, marked_cnn.key)
    assert again.steps == 0 and again.reached_target and again.weight_shift == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow  # uses the marked_cnn fixture; the federated cost itself is measured in benchmarks/watermark_federated.py
def test_reembedding_damage_is_small(digits: Split, marked_cnn: Marked) -> None:
    """One re-embedding of a partly eroded mark barely changes the task function: measured on all 1797 real digits
    (which the embedding never sees), a low-noise stand-in for the federated accuracy cost."""
    xtr, ytr, xte, yte = digits
    xall = torch.cat([xtr, xte])
    model, key = copy.deepcopy(marked_cnn.model), marked_cnn.key
    train(model, xtr, ytr, epochs=2, lr=2e-3, bs=64, seed=9)  # the "sites' round": erodes part of the mark
    eroded = wm.verify_model(model, key).matches
    assert 40 <= eroded < 98, eroded  # there is something to re-embed
    with torch.no_grad():
        ref = model(xall).argmax(1)

    marked = copy.deepcopy(model)
    rep = wm.embed(marked, key)
    with torch.no_grad():
        changed = float((marked(xall).argmax(1) != ref).float().mean())
    assert changed <= 0.03, changed  # <= 3% of real digits change their predicted class (the removed Adam settings: 3.2%)
    assert rep.reached_target and rep.steps > 0
    assert wm.verify_model(model, key).matches == eroded  # the copy was re-embedded, not the original
