"""The `fedseek` command: simulate, coordinator/site daemons and deployed runs, privacy report, certs, watermark.

Exit codes: 0 success, 1 the run failed, 2 bad configuration or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

err = Console(stderr=True)
# deployment messages are one line each (operators grep logs): no wrapping at the terminal width
dep = Console(stderr=True, soft_wrap=True)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedseek.ops.simulate import SimulationError, simulate

    try:
        simulate(args.scenario, args.out, state_dir=args.state_dir, timeout_s=args.timeout, resume=args.resume)
    except SimulationError as exc:
        err.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        return 1
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    import json

    from fedseek.config import load_coordinator
    from fedseek.ops import deploy

    cfg = load_coordinator(args.config)
    try:
        if args.coord_cmd == "start":
            problems = deploy.start_coordinator(cfg, dep)
            for p in problems:
                dep.print(f"[yellow]warning:[/] {p}", highlight=False)
            if any(not p.startswith("node ") for p in problems):
                print("error: the coordinator is running, but some allowed sites are not registered", file=sys.stderr)
                return 1
        elif args.coord_cmd == "stop":
            pf = deploy.stop_coordinator(cfg)
            print(f"coordinator stopped (pid {pf.pid})" if pf else "coordinator was not running")
        else:
            st = deploy.coordinator_status(cfg)
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                print(f"coordinator {'running (pid ' + str(st['pid']) + ')' if st['running'] else 'not running'} "
                      f"on {st['address']}, database {st['database']}")
                if "gateway" in st:
                    g = st["gateway"]
                    print(f"gateway {'running (pid ' + str(g['pid']) + ')' if g['running'] else 'NOT running'} on {g['address']}")
                for s in st["sites"]:
                    print(f"  site {s['name']:<20} {s['status']:<15} node {s['node_id'] or '-'}")
                for n in st["other_nodes"]:
                    print(f"  other node {n['node_id']} ({n['name'] or 'no name'}) {n['status']}: not in sites")
            return 0 if st["running"] else 1
    except deploy.DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _cmd_site(args: argparse.Namespace) -> int:
    from fedseek.config import load_site
    from fedseek.ops import deploy

    cfg = load_site(args.config)
    try:
        if args.site_cmd == "start":
            deploy.start_site(cfg, Path(args.config), dep, wait_s=args.wait)
        else:
            pf = deploy.stop_site(cfg)
            print(f"site {cfg.name} stopped (pid {pf.pid})" if pf else f"site {cfg.name} was not running")
    except deploy.DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from fedseek.ops import deploy
    from fedseek.ops.follow import RunError

    try:
        deploy.run_federation(args.config, args.out, console=dep, timeout_s=args.timeout)
    except deploy.DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunError as exc:
        dep.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        return 1
    return 0


def _cmd_privacy_report(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from fedseek.privacy import LEDGER_FILE

    root = Path(args.state_dir)
    ledgers = [root / LEDGER_FILE] if (root / LEDGER_FILE).exists() else sorted(root.glob(f"*/{LEDGER_FILE}"))
    if not ledgers:
        err.print(f"error: no {LEDGER_FILE} in {root} or its sub-directories")
        return 2
    out = Console()
    reports = []
    for path in ledgers:
        data = json.loads(path.read_text())
        reports.append(data)
        if args.json:
            continue
        t = Table(title=f"privacy ledger: {data.get('site') or path.parent.name}  ({path})")
        for col in ("round", "run", "noise", "sample rate", "steps", "epsilon after"):
            t.add_column(col, justify="right")
        for r in data.get("rounds", []):
            t.add_row(str(r["server_round"]), str(r["run_id"]), f"{r['noise_multiplier']:.4f}", f"{r['sample_rate']:.4f}",
                      str(r["steps"]), f"{r['epsilon_after']:.4f}")
        out.print(t)
        out.print(
            f"epsilon spent {data['epsilon']:.4f} of budget {data['epsilon_budget']:g} at delta {data['delta']:g} "
            f"({data['accountant']} accountant); {sum(h[2] for h in data['history'])} DP-SGD steps; "
            f"{len(data.get('refusals', []))} refused round(s)"
        )
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedseek.ops import pki

    try:
        if args.certs_cmd == "init":
            paths = pki.init_ca(Path(args.out), hosts=args.host or [], ips=args.ip or [], days=args.days, force=args.force)
            print(f"wrote CA and coordinator certificate to {Path(args.out)}")
            for k, v in paths.__dict__.items():
                print(f"  {k}: {v}")
        elif args.certs_cmd == "add-site":
            b = pki.add_site(Path(args.certs), args.name, args.coordinator, force=args.force)
            print(f"site bundle for {args.name}:")
            for k, v in b.__dict__.items():
                print(f"  {k}: {v}")
        elif args.certs_cmd == "show":
            print(pki.format_show(pki.show(Path(args.certs))))
    except pki.PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_watermark(args: argparse.Namespace) -> int:
    import json

    from fedseek import watermark as wm

    if args.wm_cmd == "keygen":
        if args.scenario:
            from fedseek.config import load_scenario
            from fedseek.data import load_builtin

            cfg = load_scenario(args.scenario)
            _, test = load_builtin(cfg.data.dataset, cfg.seed, test_fraction=cfg.data.test_fraction, **cfg.data.options)
            shape, classes = tuple(test.input_shape), int(test.num_classes)
        elif args.input_shape and args.num_classes:
            shape, classes = tuple(int(d) for d in args.input_shape.split(",")), int(args.num_classes)
        else:
            print("error: give --scenario, or --input-shape and --num-classes", file=sys.stderr)
            return 2
        key = wm.keygen(shape, classes, args.triggers, model_id=args.model_id)
        try:
            path = wm.save_key(key, args.out, force=args.force)
        except (FileExistsError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        digest = wm.commitment(key)
        pub = Path(str(path) + ".commitment.json")
        pub.write_text(json.dumps({"commitment": digest, **key.public_metadata()}, indent=2) + "\n")
        print(f"secret key: {path} (mode 0600; keep it private)")
        print(f"public commitment: {digest}  (also in {pub}; publish it to time-stamp your claim)")
        return 0
    try:
        res = wm.verify_file(args.model, args.key, alpha=args.alpha)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(f"matches {res.matches}/{res.n} triggers (chance 1/{res.num_classes}); "
              f"p-value {res.p_value:.3g} (exact binomial); alpha {res.alpha:g}")
        print(res.verdict)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedseek.outputs.report import write_report

    if not Path(args.run_dir).is_dir():
        print(f"error: {args.run_dir} is not a run directory", file=sys.stderr)
        return 2
    print(write_report(Path(args.run_dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedseek", description="Privacy-preserving federated learning on Flower + Opacus.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("simulate", help="run a scenario with N virtual sites (Flower simulation engine)")
    s.add_argument("scenario", nargs="?", default="simulations/hospitals.yaml", help="scenario YAML (default: %(default)s)")
    s.add_argument("--out", default="runs/latest", help="output directory (default: %(default)s)")
    s.add_argument("--state-dir", default=None, help="sites' persistent state (privacy ledgers); default OUT/sites")
    s.add_argument("--timeout", type=float, default=None, help="overall limit in seconds")
    s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint after a crash")
    s.set_defaults(func=_cmd_simulate)

    co = sub.add_parser("coordinator", help="the coordinator service: Flower SuperLink over TLS with site keys")
    cos = co.add_subparsers(dest="coord_cmd", required=True)
    for name, help_ in (("start", "start the SuperLink (detached) and register the allowed sites' keys"),
                        ("stop", "stop the SuperLink and everything it started"),
                        ("status", "is it running; which sites are registered / online")):
        q = cos.add_parser(name, help=help_)
        q.add_argument("--config", default="server/coordinator.yaml", help="coordinator YAML (default: %(default)s)")
        if name == "status":
            q.add_argument("--json", action="store_true")
        q.set_defaults(func=_cmd_coordinator)

    si = sub.add_parser("site", help="a site daemon: Flower SuperNode with the site's key and data")
    sis = si.add_subparsers(dest="site_cmd", required=True)
    q = sis.add_parser("start", help="check the site config, keys and data, then start the SuperNode (detached)")
    q.add_argument("--config", required=True, help="site YAML, e.g. clients/sites/hospital-a.yaml")
    q.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the coordinator to accept the site")
    q.set_defaults(func=_cmd_site)
    q = sis.add_parser("stop", help="stop the site's SuperNode")
    q.add_argument("--config", required=True)
    q.set_defaults(func=_cmd_site)

    r = sub.add_parser("run", help="run the federation on the deployed coordinator and its sites")
    r.add_argument("--config", default="server/coordinator.yaml", help="coordinator YAML (default: %(default)s)")
    r.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    r.add_argument("--timeout", type=float, default=None, help="overall limit in seconds")
    r.set_defaults(func=_cmd_run)

    rp = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained, with plots)")
    rp.add_argument("run_dir")
    rp.set_defaults(func=_cmd_report)

    pr = sub.add_parser("privacy", help="privacy ledgers")
    prs = pr.add_subparsers(dest="privacy_cmd", required=True)
    rep = prs.add_parser("report", help="print a site's privacy ledger (or all under a directory)")
    rep.add_argument("state_dir")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=_cmd_privacy_report)

    c = sub.add_parser("certs", help="CA, coordinator certificate and site keys")
    cs = c.add_subparsers(dest="certs_cmd", required=True)
    ci = cs.add_parser("init", help="create a CA and the coordinator's certificate")
    ci.add_argument("--out", default="certs")
    ci.add_argument("--host", action="append", help="DNS name of the coordinator (repeatable)")
    ci.add_argument("--ip", action="append", help="IP address of the coordinator (repeatable; 127.0.0.1 always added)")
    ci.add_argument("--days", type=int, default=365)
    ci.add_argument("--force", action="store_true")
    ca = cs.add_parser("add-site", help="create a site's key pair and bundle")
    ca.add_argument("name")
    ca.add_argument("--certs", default="certs")
    ca.add_argument("--coordinator", default="127.0.0.1:9092", help="coordinator address host:port")
    ca.add_argument("--force", action="store_true")
    sh = cs.add_parser("show", help="list certificates and keys with expiry")
    sh.add_argument("--certs", default="certs")
    for q in (ci, ca, sh):
        q.set_defaults(func=_cmd_certs)

    w = sub.add_parser("watermark", help="ownership watermark: keys and black-box verification")
    ws = w.add_subparsers(dest="wm_cmd", required=True)
    kg = ws.add_parser("keygen", help="make a secret watermark key and its public commitment")
    kg.add_argument("--out", required=True, help="key file to write (0600)")
    kg.add_argument("--scenario", help="take the input shape and classes from a scenario's dataset")
    kg.add_argument("--input-shape", help="e.g. 30 or 1,8,8")
    kg.add_argument("--num-classes", type=int)
    kg.add_argument("--triggers", type=int, default=None, help="trigger-set size (default: 100, or 200 for 2 classes)")
    kg.add_argument("--model-id", default="")
    kg.add_argument("--force", action="store_true")
    vf = ws.add_parser("verify", help="test a model file for the watermark (outputs only)")
    vf.add_argument("--key", required=True)
    vf.add_argument("--model", required=True, help="model.pt (with model.json beside it)")
    vf.add_argument("--alpha", type=float, default=1e-6)
    vf.add_argument("--json", action="store_true")
    for q in (kg, vf):
        q.set_defaults(func=_cmd_watermark)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedseek` console script."""
    from fedseek.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted; stopped all processes")
        return 130


if __name__ == "__main__":
    sys.exit(main())
