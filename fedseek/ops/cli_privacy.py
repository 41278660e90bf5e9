"""`fedseek privacy verify | raise-budget | show`: check a site's ledgers independently, raise a budget on the record, list entries.

Exit codes: 0 intact (or done), 1 a ledger is damaged, tampered with, inconsistent or busy (one line
on stderr says why), 2 usage errors (no such directory, no ledger there, a budget that is not a raise).
"""

from __future__ import annotations

import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer


class KindOrAll(StrEnum):
    """Which ledger(s) a command reads."""

    training = "training"
    evaluation = "evaluation"
    all = "all"


class Kind(StrEnum):
    """Which ledger a command changes."""

    training = "training"
    evaluation = "evaluation"


StateDir = Annotated[Path, typer.Argument(help="A site's state directory (where its privacy ledgers are).")]
KindsOpt = Annotated[KindOrAll, typer.Option("--kind", help="Which ledger: training, evaluation or all.")]


def _fail(message: str, code: int) -> typer.Exit:
    print(" ".join(message.split()), file=sys.stderr)
    return typer.Exit(code)


def _kinds(kind: KindOrAll) -> list[str]:
    return ["training", "evaluation"] if kind is KindOrAll.all else [kind.value]


def _num(x: float | None, fmt: str = ".6g") -> str:
    return "-" if x is None else format(x, fmt)


def _audit_table(audits: list[Any], state_dir: Path) -> Any:
    from rich.table import Table

    t = Table(title=f"privacy ledgers in {state_dir}")
    for col in ("site", "kind", "entries", "steps", "epsilon recomputed", "epsilon stored", "budget", "status"):
        t.add_column(col, justify="left" if col in ("site", "kind", "status") else "right", no_wrap=col in ("kind", "status"))
    for a in audits:
        status = {"intact": "[green]intact[/]", "absent": "absent"}.get(a.status, f"[red]{a.status.upper()}[/]")
        if a.detail and a.status == "intact":
            status += " [yellow](see note)[/]"
        t.add_row(a.site or "-", a.kind, str(a.entries), str(a.steps), _num(a.epsilon_recomputed), _num(a.epsilon_stored),
                  _num(a.budget, "g"), status)
    return t


def verify(state_dir: StateDir, kind: KindsOpt = KindOrAll.all) -> None:
    """Check marker, head, chain and entries; recompute epsilon with a fresh Opacus accountant; exit 0 intact, 1 not."""
    from rich.console import Console

    from fedseek.privacy.ledger_audit import audit

    if not state_dir.is_dir():
        raise _fail(f"error: {state_dir} is not a directory", 2)
    audits = [audit(state_dir, k) for k in _kinds(kind)]
    if all(a.status == "absent" for a in audits):
        raise _fail(f"error: no {'' if kind is KindOrAll.all else kind.value + ' '}privacy ledger in {state_dir}", 2)
    Console().print(_audit_table(audits, state_dir))
    for a in audits:
        if a.detail:
            print(f"{a.kind} ledger: {' '.join(a.detail.split())}", file=sys.stderr)
    raise typer.Exit(0 if all(a.ok for a in audits) else 1)


def raise_budget(
    state_dir: StateDir,
    to: Annotated[float, typer.Option("--to", help="The new epsilon budget (above the current one).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the ledger with your user name and the time).")],
    kind: Annotated[Kind, typer.Option("--kind", help="Which ledger: training or evaluation.")] = Kind.training,
) -> None:
    """Raise a ledger's epsilon budget with a chained budget_change entry (the only way a budget goes up)."""
    from fedseek.privacy.ledger_audit import raise_budget as raise_on_record
    from fedseek.privacy.ledger_chain import LedgerError

    if not state_dir.is_dir():
        raise _fail(f"error: {state_dir} is not a directory", 2)
    try:
        old, new = raise_on_record(state_dir, kind.value, to, reason=reason)
    except ValueError as exc:
        raise _fail(f"error: {exc}", 2) from None
    except LedgerError as exc:
        raise _fail(f"error: {exc}", 1) from None
    print(f"{kind.value} ledger in {state_dir}: epsilon budget raised from {old:g} to {new:g} ({reason.strip()})")


def _entry_row(e: dict[str, Any]) -> tuple[str, ...]:
    t = e["type"]
    if t == "charge":
        what = f"sigma {e['noise_multiplier']:.4g}  q {e['sample_rate']:.4g}  steps {e['steps']}  -> epsilon {e['epsilon_after']:.4f}"
        if "local_noise_multiplier" in e:  # distributed DP: sigma is the secure sum's noise; the site added its share
            what += f"  (distributed: own share sigma {e['local_noise_multiplier']:.4g})"
    elif t == "refusal":
        p = e["projected_epsilon"]
        what = f"projected epsilon {p if isinstance(p, str) else format(p, '.4f')}"
    elif t == "budget_change":
        what = f"budget {e['old'] if e['old'] is not None else '-'} -> {e['new']:g}  by {e.get('user', '?')}: {e.get('reason', '')}"
    else:
        what = f"calibrated noise {e['noise_multiplier']:.4g}"
    rnd = f"{e['run_id']}/{e['server_round']}" if "server_round" in e else ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e["time"])))
    return str(e["seq"]), when, t, rnd, what, str(e["hash"])[:12]


def show(state_dir: StateDir, kind: KindsOpt = KindOrAll.all) -> None:
    """List a site's ledger entries (verified first: a damaged ledger exits 1)."""
    from rich.console import Console
    from rich.table import Table

    from fedseek.privacy.ledger_chain import LedgerError
    from fedseek.privacy.ledger_verify import read_chain

    if not state_dir.is_dir():
        raise _fail(f"error: {state_dir} is not a directory", 2)
    out, shown = Console(), 0
    for k in _kinds(kind):
        try:
            chain = read_chain(state_dir, k)
        except LedgerError as exc:
            raise _fail(f"{k} ledger: {exc}", 1) from None
        if chain.header is None:
            continue
        t = Table(title=f"{k} ledger of {chain.header['site'] or '?'} ({chain.paths.ledger}; {chain.header['accountant']}, "
                        f"delta {chain.header['delta']:g})")
        for col in ("#", "time", "type", "run/round", "what", "hash"):
            t.add_column(col)
        for e in chain.entries:
            t.add_row(*_entry_row(e))
        out.print(t)
        if chain.floor_history != chain.history:
            from fedseek.privacy.accounting import epsilon_for

            delta, accountant = float(chain.header["delta"]), str(chain.header["accountant"])
            floor = epsilon_for(chain.floor_history, delta, accountant)
            out.print(f"distributed DP: epsilon {epsilon_for(chain.history, delta, accountant):.4f}"
                      f" against a coordinator that follows SecAgg+ with at most the assumed colluders; local floor (the "
                      f"site's own noise shares alone): epsilon {floor:.4f}")
        shown += 1
    if not shown:
        raise _fail(f"error: no privacy ledger in {state_dir}", 2)


def register(group: typer.Typer) -> None:
    """Add verify, raise-budget and show to the `fedseek privacy` group."""
    group.command("verify")(verify)
    group.command("raise-budget")(raise_budget)
    group.command("show")(show)
