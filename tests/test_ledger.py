"""The privacy ledger under attack and under load: charge-before-training, hash chain, head, init marker, budget changes,
the round lock across threads and processes, the evaluation ledger, and `fedseek privacy verify | raise-budget`.

The threat model: the coordinator may send anything, the ledger on disk may be deleted, cut or edited, and two
rounds may arrive at once. Whatever happens, the site must never under-count spent epsilon silently.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedseek.ops.cli import app
from fedseek.privacy.ledger import BudgetExceeded, LedgerBusy, LedgerError, PrivacyLedger
from fedseek.privacy.ledger_audit import audit
from fedseek.privacy.ledger_chain import Chain, LedgerKind, digest, paths_for

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
CHARGES = [(1.1, 0.1, 10), (1.3, 0.05, 20), (0.9, 0.2, 5)]


def _ledger(state: Path, budget: float = 50.0, kind: LedgerKind = "training", **over: Any) -> PrivacyLedger:
    return PrivacyLedger(state, accountant=over.get("accountant", "rdp"), delta=over.get("delta", DELTA), epsilon_budget=budget,
                         site="s", kind=kind)


def _charged(state: Path, charges: list[tuple[float, float, int]] = CHARGES, kind: LedgerKind = "training") -> PrivacyLedger:
    led = _ledger(state, kind=kind)
    for i, (s, q, n) in enumerate(charges):
        led.charge(s, q, n, run_id="r", server_round=i + 1)
    return led


def _doc(state: Path, kind: str = "training") -> dict[str, Any]:
    return json.loads(paths_for(state, kind).ledger.read_text())


def _write(state: Path, doc: dict[str, Any], kind: str = "training") -> None:
    paths_for(state, kind).ledger.write_text(json.dumps(doc))


def _forge(state: Path, doc: dict[str, Any], *, head: bool = True, kind: str = "training") -> None:
    """What a careful forger does: re-seal every entry, recompute the summary views and (optionally) the head file."""
    paths = paths_for(state, kind)
    prev = doc["genesis"]
    for i, e in enumerate(doc["entries"]):
        e.pop("hash", None)
        e.update(seq=i, prev=prev)
        e["hash"] = prev = digest(e)
    header = {k: doc[k] for k in ("kind", "site", "accountant", "delta", "created", "nonce")}
    doc.update(Chain(paths, header, tuple(doc["entries"])).views())
    _write(state, doc, kind)
    if head:
        paths.head.write_text(json.dumps({"genesis": doc["genesis"], "entries": len(doc["entries"]), "last": prev}))


def _refused(state: Path, match: str, kind: LedgerKind = "training") -> str:
    """Opening the ledger raises a one-line LedgerError naming the path and what to do."""
    with pytest.raises(LedgerError, match=match) as info:
        _ledger(state, kind=kind)
    msg = str(info.value)
    assert "\n" not in msg and str(paths_for(state, kind).ledger) in msg and "fedseek privacy verify" in msg
    return msg


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["privacy", *args])


# ---------------------------------------------------------------------------------------- charge


def test_charge_is_on_disk_before_it_returns(tmp_path: Path) -> None:
    """Inside the round's lock (before training), an independent reader already sees the charge: a crash keeps it."""
    led = _ledger(tmp_path)
    with led.lock():
        eps = led.charge(1.1, 0.1, 10, run_id="r", server_round=1)
        raw = _doc(tmp_path)
        other = _ledger(tmp_path)  # a restarted site, reading the disk only
    charges = [e for e in raw["entries"] if e["type"] == "charge"]
    assert [(c["noise_multiplier"], c["sample_rate"], c["steps"]) for c in charges] == [(1.1, 0.1, 10)]
    assert charges[0]["epsilon_after"] == eps == other.epsilon() > 0
    assert json.loads(paths_for(tmp_path, "training").head.read_text())["entries"] == len(raw["entries"])


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.1, 0), (1.0, 0.1, -3), (1.0, 0.1, 2.5), (1.0, 0.0, 5), (1.0, 1.5, 5),
                                                   (0.0, 0.1, 5), (-1.0, 0.1, 5), (math.nan, 0.1, 5), (1.0, math.inf, 5), (1.0, 0.1, True)])
def test_charge_refuses_an_invalid_mechanism(tmp_path: Path, sigma: float, q: float, steps: Any) -> None:
    led = _charged(tmp_path)
    before = paths_for(tmp_path, "training").ledger.read_bytes()
    for call in (led.charge, led.check):
        with pytest.raises(LedgerError, match="refusing to account"):
            call(sigma, q, steps, run_id="r", server_round=9)
    assert paths_for(tmp_path, "training").ledger.read_bytes() == before


def test_refusal_is_chained_and_persisted(tmp_path: Path) -> None:
    led = _ledger(tmp_path, budget=1.0)
    with pytest.raises(BudgetExceeded, match="refuses round 7"):
        led.check(0.8, 0.5, 50, run_id="r", server_round=7)
    again = _ledger(tmp_path, budget=1.0)
    assert [r["server_round"] for r in again.refusals] == [7] and again.steps() == 0
    assert _doc(tmp_path)["entries"][-1]["type"] == "refusal"


def test_calibrated_noise_is_persisted_and_rounds_counted(tmp_path: Path) -> None:
    led = _charged(tmp_path)
    led.charge(1.0, 0.1, 3, run_id="r", server_round=3)  # an excess charge of round 3: same round
    led.calibrated_noise = 2.5
    again = _ledger(tmp_path)
    assert again.calibrated_noise == 2.5 and again.rounds_charged() == 3 and len(again.rounds) == 4


def test_a_stale_ledger_object_never_overwrites_a_newer_charge(tmp_path: Path) -> None:
    """Two openers of the same ledger each charge: the second re-reads under the lock, so both charges count."""
    a, b = _ledger(tmp_path), _ledger(tmp_path)
    a.charge(1.1, 0.1, 10, run_id="r", server_round=1)
    b.charge(1.1, 0.1, 10, run_id="r", server_round=2)
    assert _ledger(tmp_path).history == [(1.1, 0.1, 10), (1.1, 0.1, 10)]


# ---------------------------------------------------------------------------------------- tampering


@pytest.mark.parametrize(("field", "factor"), [("epsilon_after", 0.5), ("steps", 0.5), ("noise_multiplier", 2.0), ("sample_rate", 0.5)])
def test_an_edited_entry_in_the_middle_breaks_the_chain(tmp_path: Path, field: str, factor: float) -> None:
    _charged(tmp_path)
    doc = _doc(tmp_path)
    middle = doc["entries"][2]
    assert middle["type"] == "charge"
    middle[field] = type(middle[field])(middle[field] * factor)
    _write(tmp_path, doc)
    _refused(tmp_path, "entry 2 \\(charge, round 2\\) was modified")


def test_a_resealed_edit_breaks_the_link_and_a_full_forgery_the_head(tmp_path: Path) -> None:
    _charged(tmp_path)
    doc = _doc(tmp_path)
    doc["entries"][2]["steps"] = 1
    body = {k: v for k, v in doc["entries"][2].items() if k != "hash"}
    doc["entries"][2]["hash"] = digest(body)  # re-sealed that one entry only
    _write(tmp_path, doc)
    _refused(tmp_path, "entry 3 \\(charge, round 3\\) does not follow entry 2")
    _forge(tmp_path, doc, head=False)  # every hash and summary recomputed, head left alone
    _refused(tmp_path, "do not match its head file")


def test_a_truncated_ledger_is_detected(tmp_path: Path) -> None:
    _charged(tmp_path)
    doc = _doc(tmp_path)
    doc["entries"] = doc["entries"][:-2]
    _forge(tmp_path, doc, head=False)  # a consistent, shorter chain
    _refused(tmp_path, "has 2 entries but its head file records 4: entries were removed from its end")
    paths_for(tmp_path, "training").head.unlink()
    _refused(tmp_path, "lost its head file")


def test_a_cut_file_is_unreadable(tmp_path: Path) -> None:
    _charged(tmp_path)
    path = paths_for(tmp_path, "training").ledger
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(tmp_path, "is unreadable")


def test_an_edited_summary_field_is_detected(tmp_path: Path) -> None:
    _charged(tmp_path)
    doc = _doc(tmp_path)
    doc["epsilon"] = 0.01
    _write(tmp_path, doc)
    _refused(tmp_path, "summary field 'epsilon' that disagrees")


@pytest.mark.parametrize("also", [(), ("head",), ("head", "lock")])
def test_a_deleted_ledger_after_init_is_detected(tmp_path: Path, also: tuple[str, ...]) -> None:
    _charged(tmp_path)
    paths = paths_for(tmp_path, "training")
    for p in (paths.ledger, *(getattr(paths, a) for a in also)):
        p.unlink()
    _refused(tmp_path, "is missing, but its .* shows it was created")


def test_a_fresh_state_dir_is_a_new_ledger(tmp_path: Path) -> None:
    led = _ledger(tmp_path / "new")
    assert led.steps() == 0 and led.epsilon() == 0.0 and not (tmp_path / "new").exists()  # opening writes nothing


def test_a_replaced_ledger_is_detected(tmp_path: Path) -> None:
    _charged(tmp_path / "a")
    _ledger(tmp_path / "b").charge(5.0, 0.01, 1, run_id="x", server_round=1)  # a cheaper ledger from elsewhere
    for name in ("ledger", "head"):
        src = getattr(paths_for(tmp_path / "b", "training"), name)
        getattr(paths_for(tmp_path / "a", "training"), name).write_bytes(src.read_bytes())
    _refused(tmp_path / "a", "init marker .* names another\\): it was replaced")


@pytest.mark.parametrize(("field", "value"), [("steps", 0), ("steps", -4), ("steps", 2.5), ("sample_rate", 0.0), ("sample_rate", 1.5),
                                              ("noise_multiplier", 0.0), ("noise_multiplier", -1.0)])
def test_an_invalid_entry_is_refused_even_when_properly_sealed(tmp_path: Path, field: str, value: float) -> None:
    _charged(tmp_path)
    doc = _doc(tmp_path)
    doc["entries"][2][field] = value
    _forge(tmp_path, doc)  # chain, views and head all consistent: only the value is wrong
    _refused(tmp_path, f"entry 2 \\(charge, round 2\\) is invalid: it .*{field.replace('_', ' ').split()[0]}")


def test_a_crash_between_ledger_and_head_is_accepted_and_repaired(tmp_path: Path) -> None:
    led = _charged(tmp_path)
    head = paths_for(tmp_path, "training").head
    old_head = head.read_bytes()
    led.charge(1.0, 0.1, 1, run_id="r", server_round=4)
    new_head = head.read_bytes()
    head.write_bytes(old_head)  # the head write was lost: ledger one entry ahead
    again = _ledger(tmp_path)
    assert again.steps() == 36
    with again.lock():
        pass
    assert head.read_bytes() == new_head  # repaired
    led.charge(1.0, 0.1, 1, run_id="r", server_round=5)
    head.write_bytes(old_head)  # two entries ahead is not a crash: entries were cut from the head's view
    _refused(tmp_path, "do not match its head file")


def test_an_old_format_ledger_is_migrated_into_a_chain(tmp_path: Path) -> None:
    hist = [[1.1, 0.1, 10], [1.3, 0.05, 20]]
    rounds = [{"run_id": "r", "server_round": i + 1, "noise_multiplier": s, "sample_rate": q, "steps": n, "epsilon_after": 0.0,
               "time": 1.0} for i, (s, q, n) in enumerate(hist)]
    v1 = {"version": 1, "site": "s", "accountant": "rdp", "delta": DELTA, "epsilon_budget": 50.0, "epsilon": 1.0, "history": hist,
          "rounds": rounds, "refusals": [], "calibrated_noise": 1.7}
    paths_for(tmp_path, "training").ledger.write_text(json.dumps(v1))
    led = _ledger(tmp_path)
    assert led.history == [tuple(h) for h in hist] and led.calibrated_noise == 1.7
    with led.lock():
        pass
    assert _doc(tmp_path)["version"] == 2 and paths_for(tmp_path, "training").marker.exists()
    assert _ledger(tmp_path).epsilon() == led.epsilon() > 0


def test_a_changed_accountant_or_delta_is_refused(tmp_path: Path) -> None:
    _charged(tmp_path)
    for over in ({"accountant": "prv"}, {"delta": 1e-6}):
        with pytest.raises(LedgerError, match="not comparable"):
            _ledger(tmp_path, **over)


def test_a_policy_naming_no_accountant_keeps_an_existing_ledgers_own(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The default moved from RDP to PRV: a site upgraded mid-life goes on under the accountant its ledger was started with
    (its epsilon unchanged, new charges composed under it); only a new ledger takes the default; a named one must match."""
    from fedseek.privacy.ledger_audit import recompute_epsilon

    before = _charged(tmp_path).epsilon()
    with caplog.at_level("INFO", logger="fedseek.privacy"):
        kept = PrivacyLedger(tmp_path, accountant="prv", delta=DELTA, epsilon_budget=50.0, site="s", keep_accountant=True)
    assert kept.accountant == "rdp" and kept.epsilon() == before
    assert "keeps its rdp accountant" in caplog.text
    after = kept.charge(1.1, 0.1, 10, run_id="r", server_round=9)
    assert after == pytest.approx(recompute_epsilon([*CHARGES, (1.1, 0.1, 10)], "rdp", DELTA), rel=1e-9) and after > before
    assert _doc(tmp_path)["accountant"] == "rdp"
    fresh = PrivacyLedger(tmp_path / "new", accountant="prv", delta=DELTA, epsilon_budget=50.0, keep_accountant=True)
    fresh.charge(1.1, 0.1, 10, run_id="r", server_round=1)
    assert fresh.accountant == "prv" and _doc(tmp_path / "new")["accountant"] == "prv"
    with pytest.raises(LedgerError, match="not comparable"):  # a policy that names PRV is not silently given RDP
        PrivacyLedger(tmp_path, accountant="prv", delta=DELTA, epsilon_budget=50.0, site="s")


def test_a_site_policy_keeps_its_ledgers_accountant_only_when_it_names_none(tmp_path: Path) -> None:
    """Through the site's own gate: a YAML policy without `accountant` opens an RDP ledger as RDP; with `accountant: prv` it
    is refused with the reason."""
    import numpy as np

    from fedseek.config import PrivacySpec, parse
    from fedseek.runtime.site_privacy import open_ledger
    from fedseek.runtime.site_runtime import SiteRuntime

    _charged(tmp_path)
    site = SiteRuntime(name="s", x=np.zeros((10, 2), np.float32), y=np.zeros(10, np.int64), num_classes=2, device="cpu",
                       privacy=parse(PrivacySpec, {"epsilon_budget": 50, "delta": DELTA}), state_dir=tmp_path)
    assert open_ledger(site).accountant == "rdp"
    site.privacy = parse(PrivacySpec, {"epsilon_budget": 50, "delta": DELTA, "accountant": "prv"})
    with pytest.raises(LedgerError, match="accountant=rdp .* policy now says accountant=prv"):
        open_ledger(site)


# ---------------------------------------------------------------------------------------- budget


def test_a_lowered_budget_is_accepted_and_chained(tmp_path: Path) -> None:
    _charged(tmp_path)
    led = _ledger(tmp_path, budget=20.0)
    assert led.epsilon_budget == 20.0
    with led.lock():
        pass
    doc = _doc(tmp_path)
    last, before = doc["entries"][-1], doc["entries"][-2]
    assert (last["type"], last["old"], last["new"], last["prev"]) == ("budget_change", 50.0, 20.0, before["hash"])
    assert doc["epsilon_budget"] == 20.0
    with pytest.raises(LedgerError, match="from 20 to 50"):  # the policy going back up is a raise now
        _ledger(tmp_path, budget=50.0)


def test_a_raised_budget_is_refused_until_raise_budget_is_run(tmp_path: Path) -> None:
    _charged(tmp_path)
    with pytest.raises(LedgerError, match="raises the epsilon budget from 50 to 80; raise it explicitly with `fedseek privacy "
                                          "raise-budget .* --to 80 --reason TEXT`"):
        _ledger(tmp_path, budget=80.0)
    assert _cli("raise-budget", str(tmp_path), "--to", "40", "--reason", "x").exit_code == 2  # not a raise
    assert _cli("raise-budget", str(tmp_path / "nope"), "--to", "80", "--reason", "x").exit_code == 2
    res = _cli("raise-budget", str(tmp_path), "--to", "80", "--reason", "DPO approval 2024-17")
    assert res.exit_code == 0, res.output
    led = _ledger(tmp_path, budget=80.0)
    assert led.epsilon_budget == 80.0 and led.steps() == 35
    last = _doc(tmp_path)["entries"][-1]
    assert (last["type"], last["old"], last["new"], last["reason"], last["user"]) == (
        "budget_change", 50.0, 80.0, "DPO approval 2024-17", getpass.getuser())


def test_raise_budget_is_refused_while_a_round_holds_the_lock(tmp_path: Path) -> None:
    led = _charged(tmp_path)
    with led.lock():
        res = _cli("raise-budget", str(tmp_path), "--to", "80", "--reason", "x")
    assert res.exit_code == 1 and "in progress" in res.output
    assert _ledger(tmp_path).stored_budget == 50.0


# ---------------------------------------------------------------------------------------- verify


def test_verify_recomputes_epsilon_independently(tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    _charged(tmp_path)
    independent = RDPAccountant()
    for s, q, n in CHARGES:
        for _ in range(n):
            independent.step(noise_multiplier=s, sample_rate=q)
    expected = independent.get_epsilon(delta=DELTA)
    result = audit(tmp_path, "training")
    assert result.status == "intact" and result.steps == 35 and result.entries == 4
    assert result.epsilon_recomputed == pytest.approx(expected, rel=1e-6)
    res = _cli("verify", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "intact" in res.output and "absent" in res.output  # no evaluation ledger yet


def test_verify_exits_1_on_a_tampered_ledger(tmp_path: Path) -> None:
    _charged(tmp_path)
    doc = _doc(tmp_path)
    doc["entries"][1]["steps"] = 1
    _write(tmp_path, doc)
    res = _cli("verify", str(tmp_path), "--kind", "training")
    assert res.exit_code == 1
    assert "entry 1 (charge, round 1) was modified" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_verify_catches_a_stored_epsilon_its_entries_do_not_give(tmp_path: Path) -> None:
    """A fully re-sealed forgery (chain, views, head) that under-states epsilon: only the recomputation catches it."""
    _charged(tmp_path)
    doc = _doc(tmp_path)
    for e in doc["entries"]:
        if e["type"] == "charge":
            e["epsilon_after"] = e["epsilon_after"] / 2
    _forge(tmp_path, doc)
    assert _ledger(tmp_path).epsilon() > doc["epsilon"]  # accounting uses the mechanisms, never the stored number
    res = _cli("verify", str(tmp_path))
    assert res.exit_code == 1 and "UNDER-counted" in res.stderr


def test_verify_usage_errors_exit_2(tmp_path: Path) -> None:
    assert _cli("verify", str(tmp_path / "nope")).exit_code == 2
    assert _cli("verify", str(tmp_path)).exit_code == 2  # no ledger there
    assert _cli("verify", str(tmp_path), "--kind", "bogus").exit_code == 2


# ---------------------------------------------------------------------------------------- lock


@pytest.mark.parametrize("openers", ["each its own ledger object", "one shared ledger object"])
def test_two_threads_contending_for_the_lock_exactly_one_wins(tmp_path: Path, openers: str) -> None:
    _charged(tmp_path)
    shared = _ledger(tmp_path)
    barrier = threading.Barrier(2)
    got: list[int] = []
    busy: list[str] = []

    def round_() -> None:
        led = shared if openers.startswith("one") else _ledger(tmp_path)
        barrier.wait()
        try:
            with led.lock():
                got.append(threading.get_ident())
                time.sleep(0.5)
        except LedgerBusy as exc:
            busy.append(str(exc))

    threads = [threading.Thread(target=round_) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 1 and len(busy) == 1, (got, busy)
    assert "another round is in progress at this site" in busy[0]


def test_a_write_while_another_round_holds_the_lock_is_busy(tmp_path: Path) -> None:
    holder = _charged(tmp_path)
    other = _ledger(tmp_path)
    with holder.lock():
        with pytest.raises(LedgerBusy):
            other.charge(1.0, 0.1, 5, run_id="r", server_round=9)
        with pytest.raises(LedgerBusy):
            _ledger(tmp_path).lock().__enter__()
    assert _ledger(tmp_path).steps() == 35
    with _ledger(tmp_path, kind="evaluation").lock():  # the evaluation ledger has its own lock
        pass


_CONTENDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fedseek.privacy.ledger import LedgerBusy, PrivacyLedger
    state, me = Path(sys.argv[1]), sys.argv[2]
    led = PrivacyLedger(state, accountant="rdp", delta=1e-5, epsilon_budget=50.0)
    (state / f"ready-{me}").touch()
    while len(list(state.glob("ready-*"))) < int(sys.argv[3]):
        time.sleep(0.01)
    try:
        with led.lock():
            print("got", flush=True)
            while not (state / "release").exists():
                time.sleep(0.01)
    except LedgerBusy as exc:
        print("busy", exc, flush=True)
""")


def _contender(state: Path, me: str, n: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _CONTENDER, str(state), me, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


def test_two_processes_contending_for_the_lock_exactly_one_wins(tmp_path: Path) -> None:
    _charged(tmp_path)
    procs = [_contender(tmp_path, str(i), 2) for i in range(2)]
    try:
        first = [p.stdout.readline() for p in procs if p.stdout is not None]
    finally:
        (tmp_path / "release").touch()
        outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(line.split()[0] for line in first) == ["busy", "got"], (first, outs)
    assert "another round is in progress at this site" in next(line for line in first if line.startswith("busy"))


def test_a_process_cannot_take_the_lock_a_round_in_this_process_holds(tmp_path: Path) -> None:
    led = _charged(tmp_path)
    with led.lock():
        proc = _contender(tmp_path, "child", 1)
        out, err = proc.communicate(timeout=60)
    assert out.startswith("busy"), (out, err)
    (tmp_path / "release").touch()
    proc = _contender(tmp_path, "again", 1)  # released: now the other process gets it
    out, err = proc.communicate(timeout=60)
    assert out.startswith("got"), (out, err)


# ---------------------------------------------------------------------------------------- evaluation ledger


def test_the_evaluation_ledger_is_a_separate_file_with_its_own_budget(tmp_path: Path) -> None:
    _charged(tmp_path)
    train_before = paths_for(tmp_path, "training").ledger.read_bytes()
    ev = _ledger(tmp_path, budget=1.0, kind="evaluation")
    assert ev.epsilon() == 0.0 and ev.epsilon_budget == 1.0
    eps = ev.charge(5.0, 1.0, 1, run_id="r", server_round=1)  # one Gaussian release
    assert 0 < eps <= 1.0
    with pytest.raises(BudgetExceeded):
        ev.check(0.5, 1.0, 1, run_id="r", server_round=2)
    assert paths_for(tmp_path, "training").ledger.read_bytes() == train_before
    assert _doc(tmp_path, "evaluation")["kind"] == "evaluation"
    assert _ledger(tmp_path, budget=1.0, kind="evaluation").history == [(5.0, 1.0, 1)]
    assert _ledger(tmp_path).steps() == 35
    with pytest.raises(LedgerError, match="--kind evaluation"):
        _ledger(tmp_path, budget=2.0, kind="evaluation")
    paths_for(tmp_path, "evaluation").ledger.unlink()
    _refused(tmp_path, "is missing", kind="evaluation")
    assert _ledger(tmp_path).steps() == 35  # the training ledger is unaffected
    res = _cli("verify", str(tmp_path))
    assert res.exit_code == 1 and "evaluation ledger" in res.stderr


def test_show_lists_entries_and_refuses_a_damaged_ledger(tmp_path: Path) -> None:
    _charged(tmp_path)
    res = _cli("show", str(tmp_path), "--kind", "training")
    assert res.exit_code == 0 and res.output.count("charge") == 3, res.output
    paths_for(tmp_path, "training").head.unlink()
    res = _cli("show", str(tmp_path))
    assert res.exit_code == 1 and "lost its head file" in res.stderr
