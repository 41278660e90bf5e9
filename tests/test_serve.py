"""`fedseek serve` against a real HTTP client, and the output watermark (fedseek.watermark.outputs).

The server is the real command (uvicorn) started by the test on 127.0.0.1 and stopped by its
process id. Predictions must equal the model's own (unmarked answers) or be the keyed choice of
its top two (marked answers, all logged); bad requests get a 4xx with one line; /metrics scrapes.
The watermark: a surrogate trained on the served answers is detected from the mark log, an
independently trained model is not, and a log that was edited or belongs to another key is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from fedseek import watermark as wm
from fedseek.ops.processes import free_port, stop_child
from fedseek.outputs.model_card import ModelCard, Preprocessing
from fedseek.serving.predictor import Predictor
from fedseek.train.models import build_model
from fedseek.watermark.mark_log import read_log
from fedseek.watermark.output_verdict import verdict
from fedseek.watermark.outputs import mark, output_subkey
from tests.conftest import ROOT

FEATURES = [f"f{i}" for i in range(6)]


def _run_dir(path: Path, seed: int = 3, *, key: bool = True) -> Path:
    """A run directory: an MLP on 6 features with given scaling, 3 classes, and (optionally) its watermark key."""
    path.mkdir(parents=True)
    model = build_model("mlp", (6,), 3, [8], seed=seed)
    torch.save(model.state_dict(), path / "model.pt")
    card = ModelCard(kind="mlp", hidden=[8], input_shape=[6], num_classes=3, features=FEATURES, classes=["low", "mid", "high"],
                     preprocessing=Preprocessing(scaling="given", columns=FEATURES, mean=dict.fromkeys(FEATURES, 0.5),
                                                 std=dict.fromkeys(FEATURES, 0.25)))
    (path / "model.json").write_text(card.model_dump_json())
    if key:
        wm.save_key(wm.keygen((6,), 3, 100, model_id=path.name), path / "watermark.key")
    return path


def _rows(n: int, seed: int = 0) -> pd.DataFrame:
    return pd.DataFrame(np.random.default_rng(seed).uniform(0, 1, (n, 6)), columns=FEATURES)


class Server:
    """`fedseek serve` in a subprocess on loopback; stopped by pid."""

    def __init__(self, run: Path, *extra: str, scheme: str = "http", verify: str | bool = True) -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "fedseek", "serve", str(run), "--port", str(self.port), *extra], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.client = httpx.Client(base_url=self.url, timeout=30, verify=verify)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not answer /health within 60 s")

    def stop(self) -> str:
        self.client.close()
        stop_child(self.proc)
        return self.proc.stdout.read() if self.proc.stdout else ""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = _run_dir(tmp_path_factory.mktemp("served") / "run")
    server = Server(run, "--max-rows", "500", "--watermark-margin", "0.2")
    try:
        yield run, server
    finally:
        server.stop()


def test_served_answers_are_the_models_own_or_its_keyed_top_two_and_marked_ones_are_logged(served):
    run, server = served
    rows = _rows(300)
    resp = server.client.post("/predict", json={"rows": rows.to_dict(orient="records")})
    assert resp.status_code == 200, resp.text
    answers = resp.json()["predictions"]
    own = Predictor(run).predict(rows)
    assert own.probs is not None
    order = np.argsort(-own.probs, 1)
    margins = own.probs[np.arange(len(rows)), order[:, 0]] - own.probs[np.arange(len(rows)), order[:, 1]]
    classes = ["low", "mid", "high"]
    for a, p, o, mg in zip(answers, own.probs, order, margins, strict=True):
        served_p = np.array([a["probabilities"][c] for c in classes])
        if mg > 0.2:
            assert a["label"] == classes[o[0]] and np.allclose(served_p, p, atol=1e-6)
        else:
            assert a["label"] in (classes[o[0]], classes[o[1]]) and served_p.max() == pytest.approx(0.9 * (p[o[0]] + p[o[1]]), rel=1e-5)
    logged = read_log(run / "served_marks.jsonl", output_subkey(wm.load_key(run / "watermark.key").seed_hex))
    assert logged.columns == FEATURES and len(logged.rows) >= int((margins <= 0.2).sum()) > 0  # (the module's other requests add more)
    by_unit: dict[str, set[str]] = {}
    for unit, served_class in zip(logged.units, logged.served, strict=True):
        by_unit.setdefault(unit, set()).add(served_class)
    assert all(len(v) == 1 for v in by_unit.values()) and len(by_unit) >= 0.5 * len(logged.rows)  # one keyed class per unit
    # CSV in, the same answers out (same rows, same keyed choices)
    csv = server.client.post("/predict", content=rows.head(20).to_csv(index=False), headers={"content-type": "text/csv"})
    assert [a["label"] for a in csv.json()["predictions"]] == [a["label"] for a in answers[:20]]
    health = server.client.get("/health").json()
    assert health["status"] == "ok" and health["features"] == FEATURES and health["output_watermark"] is True


@pytest.mark.parametrize(("body", "headers", "status", "message"), [
    (b"{not json", {"content-type": "application/json"}, 400, "body is not JSON"),
    (b'{"rows": 3}', {"content-type": "application/json"}, 400, "JSON body must be"),
    (b'{"rows": [{"f0": [1, 2]}]}', {"content-type": "application/json"}, 400, "single values"),
    (b"f0,f1\n1,2\n", {"content-type": "text/csv"}, 422, "feature columns ['f2', 'f3', 'f4', 'f5'] not found"),
    (b'{"rows": [{"f0": 1, "f1": 1, "f2": 1, "f3": 1, "f4": 1, "f5": "high"}]}', {"content-type": "application/json"}, 422,
     "non-numeric feature columns ['f5']"),
    (b'{"rows": []}', {"content-type": "application/json"}, 422, "no rows"),
    (b"abc", {"content-type": "text/plain"}, 415, "content type 'text/plain' not supported"),
    (json.dumps({"rows": [dict.fromkeys(FEATURES, 0.1)] * 501}).encode(), {"content-type": "application/json"}, 413, "at most 500"),
    (b"x" * (2 << 20), {"content-type": "application/json"}, 413, "at most 1048576"),
])
def test_bad_requests_get_a_4xx_with_one_line(served, body, headers, status, message):
    _, server = served
    resp = server.client.post("/predict", content=body, headers=headers)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in resp.text


def test_metrics_scrape_counts_requests_errors_latency_and_marked_answers(served):
    from prometheus_client.parser import text_string_to_metric_families

    _, server = served

    def scrape() -> dict:
        text = server.client.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}

    before = scrape()
    server.client.post("/predict", json={"rows": _rows(50, seed=9).to_dict(orient="records")})
    server.client.post("/predict", content=b"{", headers={"content-type": "application/json"})
    after = scrape()
    run = ("run", "run")

    def grew(name: str, *labels: tuple[str, str]) -> float:
        key = (name, tuple(sorted((*labels, run))))
        return after[key] - before.get(key, 0.0)

    assert grew("fedseek_serve_requests_total", ("code", "200"), ("endpoint", "/predict")) == 1
    assert grew("fedseek_serve_errors_total", ("code", "400"), ("endpoint", "/predict")) == 1
    assert grew("fedseek_serve_request_seconds_count", ("endpoint", "/predict")) == 2
    assert grew("fedseek_serve_rows_total") == 50 and grew("fedseek_serve_marked_answers_total") >= 1


def test_https_with_a_certificate_and_int8(tmp_path):
    """--tls-cert/--tls-key serve HTTPS (a client trusting the CA gets answers); --int8 answers like fp32 on most rows."""
    from fedseek.ops.pki import ca

    run = _run_dir(tmp_path / "run", key=False)
    paths = ca.init_ca(tmp_path / "certs", hosts=[], ips=[])  # the federation's CA and coordinator certificate (fedseek certs init)
    server = Server(run, "--tls-cert", str(paths.coordinator_crt), "--tls-key", str(paths.coordinator_key), "--int8",
                    scheme="https", verify=str(paths.ca_crt))
    try:
        rows = _rows(200, seed=1)
        resp = server.client.post("/predict", json={"rows": rows.to_dict(orient="records")})
        assert resp.status_code == 200 and server.client.get("/health").json()["int8"] is True
        fp32 = Predictor(run).predict(rows).labels
        agree = np.mean([a["label"] == b for a, b in zip(resp.json()["predictions"], fp32, strict=True)])
        assert agree >= 0.95
    finally:
        out = server.stop()
    assert "https://127.0.0.1" in out and "output watermark: off" in out


def test_verify_outputs_detects_the_marked_endpoint_and_a_model_trained_on_it_not_an_independent_one(tmp_path, capsys):
    """`fedseek watermark verify-outputs` through the CLI's entry point in-process (the same code as the console script)."""
    from fedseek.ops.cli import main
    from fedseek.train.local import train_local

    run = _run_dir(tmp_path / "run")
    log, key = run / "served_marks.jsonl", run / "watermark.key"
    rows = _rows(400, seed=2)

    def verify(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["watermark", "verify-outputs", "--key", str(key), "--log", str(log), "--json", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    server = Server(run, "--watermark-margin", "0.2")
    try:
        answers = server.client.post("/predict", json={"rows": rows.to_dict(orient="records")}).json()["predictions"]
        endpoint = verify("--url", server.url)  # the marked endpoint replays its keyed answers
        labels_only = verify("--url", server.url, "--labels-only")
        capsys.readouterr()
        assert main(["watermark", "verify-outputs", "--key", str(key), "--log", str(log), "--url", server.url]) == 0
        text = capsys.readouterr().out
    finally:
        server.stop()
    assert endpoint[0] == 0, endpoint[2]
    res = json.loads(endpoint[1])
    # its probabilities come back with the labels: the score test decides; every unit favours the served class
    assert res["test"] == "score" and res["detected"] and res["score_units"] == res["units"] >= 30
    assert res["scheme"] == "fedseek-output-wm-v2"
    assert res["p_value"] == pytest.approx(0.5 ** res["units"]) and res["logged"] >= res["units"]
    assert res["matches"] == res["n"] == res["units"] and res["p_sign"] == pytest.approx(0.5 ** res["n"])
    sign = json.loads(labels_only[1])
    assert sign["test"] == "sign" and sign["p_value"] == pytest.approx(res["p_sign"]) and sign["detected"]
    assert "score test on its probabilities" in text and "(score test)" in text and "DETECTED" in text
    # a model trained on the served answers (its own run directory, the same card) carries the mark
    classes = ["low", "mid", "high"]
    sur_dir = _run_dir(tmp_path / "surrogate", seed=7, key=False)
    card = ModelCard.model_validate_json((sur_dir / "model.json").read_text()).model_copy(update={"hidden": [64]})
    (sur_dir / "model.json").write_text(card.model_dump_json())
    surrogate = build_model("mlp", (6,), 3, [64], seed=7)
    x = ((rows.to_numpy() - 0.5) / 0.25).astype(np.float32)
    train_local(surrogate, x, np.array([classes.index(a["label"]) for a in answers]), num_classes=3, epochs=300, lr=0.1,
                batch_size=32, momentum=0.9, seed=7)
    torch.save(surrogate.state_dict(), sur_dir / "model.pt")
    sur = json.loads(verify("--model", str(sur_dir))[1])
    assert sur["detected"] and sur["test"] == "score", sur
    # the served model's own weights do not reproduce the keyed answers (a copied weight file is the weight watermark's case),
    # nor does an independent model
    for other in (run, _run_dir(tmp_path / "other", seed=11, key=False)):
        indep = json.loads(verify("--model", str(other))[1])
        assert not indep["detected"] and indep["p_value"] > 1e-3 and indep["p_sign"] > 1e-3, indep
    # a log edited after the fact (or another key's) is refused with one line
    lines = log.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["served"] = "low" if entry["served"] != "low" else "mid"
    log.write_text("\n".join([lines[0], json.dumps(entry), *lines[2:]]) + "\n")
    code, _, err = verify("--model", str(run))
    assert code == 2 and "line 2: its tag does not match this key" in err and len(err.strip().splitlines()) == 1


MINI_MARGIN = 0.2


def test_a_surrogate_trained_on_served_answers_carries_the_mark():
    """Extraction in miniature: 1000 natural queries to a breast-cancer model, hard labels; the surrogate is detected at
    p <= 1e-6 from the logged marked queries, a model trained on the true labels is not. The key is fixed (the test is
    deterministic); with 16 keys (this one and 15 others) the surrogate gave p <= 5e-10 every time (31-47 units, at most
    one unmatched), the independent model p 0.01-0.99."""
    from fedseek.data import load_builtin
    from fedseek.train.local import predict_scores, train_local

    train, test = load_builtin("breast_cancer", 0, test_fraction=0.25)
    served = build_model("mlp", train.input_shape, 2, [64], seed=1)
    train_local(served, train.x, train.y, num_classes=2, epochs=3, lr=0.05, batch_size=32, seed=1)
    rng = np.random.default_rng(0)
    xq = np.concatenate([train.x, train.x[rng.integers(0, len(train.x), 574)] + rng.normal(0, 0.1, (574, 30)).astype(np.float32)])
    key = np.random.default_rng(18).bytes(32)
    m = mark(predict_scores(served, xq), xq, key, MINI_MARGIN)
    units = [m.units[i] for i in np.flatnonzero(m.marked)]
    assert m.marked.sum() >= 25 and len(set(units)) < m.marked.sum()  # jittered copies of a row share units

    def fitted(y: np.ndarray, x: np.ndarray, seed: int) -> torch.nn.Module:
        model = build_model("mlp", train.input_shape, 2, [64], seed=seed)
        train_local(model, x, y, num_classes=2, epochs=300, lr=0.1, batch_size=64, momentum=0.9, seed=seed)
        return model

    surrogate = fitted(m.labels, xq, 5)
    sur = verdict(predict_scores(surrogate, xq[m.marked]).argmax(1), m.labels[m.marked], m.other[m.marked], units)
    independent = fitted(train.y, train.x, 6)
    ind = verdict(predict_scores(independent, xq[m.marked]).argmax(1), m.labels[m.marked], m.other[m.marked], units)
    assert sur.detected, sur
    assert not ind.detected and ind.p_value > 1e-3, ind
    served_acc = float((predict_scores(served, test.x).argmax(1) == test.y).mean())
    marked_acc = float((mark(predict_scores(served, test.x), test.x, key, MINI_MARGIN).labels == test.y).mean())
    assert marked_acc >= served_acc - 0.05  # the exact accuracy cost is measured in benchmarks/output_watermark.py


def _near_ties(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n standardised feature rows, each twice (the second with N(0, 0.1) jitter), and near-tie probabilities for 3 classes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, d))
    x = np.concatenate([x, x + rng.normal(0, 0.1, x.shape)])
    top = rng.uniform(0.40, 0.45, 2 * n)
    p = np.stack([top, 0.9 - top, np.full(2 * n, 0.1)], 1)[:, rng.permutation(3)]
    return x, p


def test_near_duplicate_queries_share_a_unit_and_its_keyed_class_distinct_rows_do_not():
    from fedseek.watermark.outputs import CellSpec

    x, p = _near_ties(400, 30, 1)
    key = np.random.default_rng(2).bytes(32)
    m = mark(p, x, key, 0.15)
    assert m.marked.all()
    first, copy = m.units[:400], m.units[400:]
    same = np.mean([a == b for a, b in zip(first, copy, strict=True)])
    assert same >= 0.35, same  # about (1 - 0.8 * 0.1 / 0.7) ** 6 = 0.48: each projection moves by N(0, 0.1) at width 0.7
    assert len(set(first)) >= 0.95 * 400  # distinct rows (root mean square difference ~1.4) land in distinct cells
    for a, b, la, lb in zip(first, copy, m.labels[:400], m.labels[400:], strict=True):
        assert a != b or la == lb  # one keyed class per unit
    assert {int(v) for v in m.labels} <= {int(c) for c in np.argsort(-p, 1)[:, :2].ravel()}
    rows = np.arange(800)
    served_share = m.probs[rows, m.labels] / (m.probs[rows, m.labels] + m.probs[rows, m.other])
    assert np.allclose(served_share, 0.9)
    # another key cuts other cells; a wider cell groups more
    assert mark(p, x, np.random.default_rng(3).bytes(32), 0.15).units[:400] != first
    wider = mark(p, x, key, 0.15, CellSpec(width=2.0)).units
    assert np.mean([a == b for a, b in zip(wider[:400], wider[400:], strict=True)]) >= 0.65  # about 0.78
    wide = mark(p, x, key, 0.15, CellSpec(width=20.0))
    assert len(set(wide.units)) < len(set(m.units)) / 2


def test_the_unit_test_is_exact_under_the_null_for_any_suspect():
    """A suspect that does not know the key (here: fixed answers that depend on the features) matches each unit's keyed class
    with probability 1/2: over 300 keys the match rate is 1/2 and the p-values are not small more often than they should be."""
    x, p = _near_ties(60, 8, 4)
    suspect = np.where(x[:, 0] > 0, np.argsort(-p, 1)[:, 0], np.argsort(-p, 1)[:, 1])  # fixed, feature-dependent, in-pair
    q = np.clip(p + np.random.default_rng(5).normal(0, 0.2, p.shape), 0, None)  # the suspect's probabilities: fixed too
    matches, trials, small, small_score = 0, 0, 0, 0
    for k in range(300):
        m = mark(p, x, np.random.default_rng(1000 + k).bytes(32), 0.15)
        v = verdict(suspect, m.labels, m.other, m.units, suspect_probs=[{str(c): float(v) for c, v in enumerate(r)} for r in q])
        assert v.test == "score" and v.score_units > 50
        matches, trials = matches + v.matches, trials + v.n
        small, small_score = small + (v.p_sign <= 0.05), small_score + (v.p_value <= 0.05)
    assert trials > 300 * 50
    assert abs(matches / trials - 0.5) < 0.01, matches / trials
    assert small <= 0.05 * 300 + 8  # both tests are exact or conservative: P(p <= 0.05) <= 0.05 (binomial sd of the count: 3.8)
    assert small_score <= 0.05 * 300 + 8, small_score


def test_the_score_tests_null_distribution_is_the_fair_subset_sum_of_the_weights():
    import itertools

    from fedseek.watermark.output_verdict import score_p_value

    rng = np.random.default_rng(9)
    for _ in range(20):
        gaps = np.round(rng.uniform(-1, 1, rng.integers(1, 11)), 3)
        w, observed = np.rint(np.abs(gaps) * 1000), np.rint(np.abs(gaps) * 1000)[gaps > 0].sum()
        brute = np.mean([float(np.dot(s, w) >= observed) for s in itertools.product((0, 1), repeat=len(w))])
        p, units = score_p_value(gaps)
        assert p == pytest.approx(brute) and units == int((w > 0).sum())
    assert score_p_value([0.8] * 40)[0] == pytest.approx(0.5**40)  # every unit ahead: only the all-positive signs reach it
    assert score_p_value([0.0, float("nan")]) == (1.0, 0)
    assert score_p_value([1e12] * 5) == score_p_value([1.0] * 5)  # an endpoint's out-of-range "probabilities" are clipped
    assert score_p_value([0.9] * 30 + [-0.01] * 10)[0] < score_p_value([0.9] * 30 + [-0.9] * 10)[0]  # small misses cost little


def test_a_mark_log_of_the_earlier_per_query_scheme_is_still_verifiable_and_not_appended_to(tmp_path):
    from fedseek.watermark.mark_log import MarkLog, MarkLogError, entry_tag
    from fedseek.watermark.outputs import SCHEME_V1

    key = output_subkey("ab" * 32)
    rows = [[0.1, 0.2], [0.3, 0.4], [0.1, 0.2]]  # the first row asked twice: one coin, so one trial
    lines = [json.dumps({"scheme": SCHEME_V1, "columns": ["a", "b"]})]
    lines += [json.dumps({"time": 0, "row": r, "served": "x", "other": "y", "tag": entry_tag(key, r, "x", "y")}) for r in rows]
    (tmp_path / "v1.jsonl").write_text("\n".join(lines) + "\n")
    logged = read_log(tmp_path / "v1.jsonl", key)
    assert logged.scheme == SCHEME_V1 and logged.units[0] == logged.units[2] != logged.units[1]
    v = verdict(["x", "x", "x"], logged.served, logged.other, logged.units)
    assert (v.matches, v.n, v.units, v.logged) == (2, 2, 2, 3) and v.p_value == pytest.approx(0.25)
    with pytest.raises(MarkLogError, match="an earlier scheme"):
        MarkLog(tmp_path / "v1.jsonl", ["a", "b"], key)
    MarkLog(tmp_path / "v2.jsonl", ["a", "b"], key)
    with pytest.raises(MarkLogError, match="give --mark-log a new file"):
        MarkLog(tmp_path / "v2.jsonl", ["a", "c"], key)


def test_the_margin_for_an_accuracy_budget_counts_half_the_top_two_difference_of_the_marked_rows():
    from fedseek.watermark.outputs import margin_for_cost

    # 4 rows by increasing margin: a near-tie the runner-up gets right (marking it gains 12.5 points of 4 rows in
    # expectation), then three rows the top class gets right (each costs 12.5 points when marked)
    p = np.array([[0.49, 0.51], [0.35, 0.65], [0.25, 0.75], [0.2, 0.8]])
    y = np.array([0, 1, 1, 1])
    free = margin_for_cost(p, y, 0.0)
    assert free.marked_share == 0.5 and free.expected_drop_points == pytest.approx(0.0) and 0.3 < free.margin < 0.5
    more = margin_for_cost(p, y, 12.5)
    assert more.marked_share == 0.75 and more.expected_drop_points == pytest.approx(12.5) and 0.5 < more.margin < 0.6
    assert margin_for_cost(p, y, 100.0).marked_share == 1.0


def test_calibrate_outputs_prints_the_margin_for_a_budget(tmp_path, capsys):
    from fedseek.ops.cli import main

    run = _run_dir(tmp_path / "run", key=False)
    rows = _rows(300, seed=6)
    own = Predictor(run).predict(rows)
    rows.assign(y=own.labels).to_csv(tmp_path / "labelled.csv", index=False)  # labels = the model's own: every flip costs
    capsys.readouterr()
    assert main(["watermark", "calibrate-outputs", "--model", str(run), "--table", str(tmp_path / "labelled.csv"),
                 "--label-column", "y", "--cost", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "--watermark-margin" in out and "budget 0.5" in out
    share = float(out.split("marks ")[1].split("%")[0]) / 100
    assert 0 < share <= 0.011  # a flip of a correct answer costs half a row: a 0.5-point budget marks at most 1% of rows
    assert main(["watermark", "calibrate-outputs", "--model", str(run), "--table", str(tmp_path / "labelled.csv"),
                 "--label-column", "nope"]) == 2
    assert "label column 'nope' not found" in capsys.readouterr().err


def test_serve_refuses_bad_watermark_settings_and_an_earlier_schemes_log_with_one_line(tmp_path):
    from fedseek.ops.serve import ServeError, ServeOptions, build_service
    from fedseek.watermark.outputs import SCHEME_V1

    run = _run_dir(tmp_path / "run")
    for opts, message in ((ServeOptions(str(run), margin=1.5), "--watermark-margin 1.5: must be in [0, 1]"),
                          (ServeOptions(str(run), cell_width=0.0), "--watermark-cell-width 0.0: must be > 0"),
                          (ServeOptions(str(run), cell_width=float("inf")), "--watermark-cell-width inf: must be > 0")):
        with pytest.raises(ServeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build_service(opts)
    old = json.dumps({"scheme": SCHEME_V1, "columns": FEATURES}) + "\n"
    (run / "served_marks.jsonl").write_text(old)
    with pytest.raises(ServeError, match="an earlier scheme.*give --mark-log a new file"):  # a log the operator named
        build_service(ServeOptions(str(run), mark_log=str(run / "served_marks.jsonl")))
    _, how = build_service(ServeOptions(str(run)))  # the default log: an upgraded server starts a new one beside it
    assert "served_marks.v2.jsonl" in how and "earlier scheme's log, kept as it is" in how
    assert (run / "served_marks.jsonl").read_text() == old and (run / "served_marks.v2.jsonl").exists()
    _, how = build_service(ServeOptions(str(run), mark_log=str(tmp_path / "new.jsonl"), cell_width=1.5))
    assert "cell width 1.5" in how and json.loads((tmp_path / "new.jsonl").read_text())["cells"] == {"planes": 6, "width": 1.5}


def test_a_labels_only_endpoint_answers_without_probabilities_and_is_tested_on_its_labels(tmp_path, capsys):
    """--labels-only: marked answers cannot be told from others by their values; verify-outputs falls back to the sign test."""
    from fedseek.ops.cli import main

    run = _run_dir(tmp_path / "run")
    server = Server(run, "--watermark-margin", "0.2", "--labels-only")
    try:
        rows = _rows(300, seed=4)
        answers = server.client.post("/predict", json={"rows": rows.to_dict(orient="records")}).json()["predictions"]
        assert answers and all(set(a) == {"label"} for a in answers)
        assert server.client.get("/health").json()["probabilities"] is False
        capsys.readouterr()
        code = main(["watermark", "verify-outputs", "--key", str(run / "watermark.key"), "--log", str(run / "served_marks.jsonl"),
                     "--url", server.url, "--json"])
        res = json.loads(capsys.readouterr().out)
    finally:
        server.stop()
    assert code == 0 and res["test"] == "sign" and res["detected"] and res["matches"] == res["n"] >= 30
