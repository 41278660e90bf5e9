"""Commands for key material: `certs init|add-site|show` (the federation's PKI) and `watermark keygen|verify`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

certs_app = typer.Typer(help="CA, coordinator certificate and site keys.", no_args_is_help=True)
watermark_app = typer.Typer(help="Ownership watermark: keys and black-box verification.", no_args_is_help=True)

Force = Annotated[bool, typer.Option("--force", help="Overwrite existing files.")]
CertsDir = Annotated[str, typer.Option("--certs", help="The certificates directory.")]


def _pki_error(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


@certs_app.command("init")
def certs_init(
    out: Annotated[str, typer.Option("--out", help="Directory to write the CA and coordinator certificate to.")] = "certs",
    host: Annotated[list[str] | None, typer.Option("--host", help="DNS name of the coordinator (repeatable).")] = None,
    ip: Annotated[list[str] | None,
                  typer.Option("--ip", help="IP address of the coordinator (repeatable; 127.0.0.1 always added).")] = None,
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 365,
    force: Force = False,
) -> int:
    """Create a CA and the coordinator's certificate."""
    from fedseek.ops import pki

    try:
        paths = pki.init_ca(Path(out), hosts=host or [], ips=ip or [], days=days, force=force)
    except pki.PkiError as exc:
        return _pki_error(exc)
    print(f"wrote CA and coordinator certificate to {Path(out)}")
    for k, v in paths.__dict__.items():
        print(f"  {k}: {v}")
    return 0


@certs_app.command("add-site")
def certs_add_site(
    name: Annotated[str, typer.Argument(help="The site's name.")],
    certs: CertsDir = "certs",
    coordinator: Annotated[str, typer.Option("--coordinator", help="Coordinator address host:port.")] = "127.0.0.1:9092",
    force: Force = False,
) -> int:
    """Create a site's key pair and bundle."""
    from fedseek.ops import pki

    try:
        bundle = pki.add_site(Path(certs), name, coordinator, force=force)
    except pki.PkiError as exc:
        return _pki_error(exc)
    print(f"site bundle for {name}:")
    for k, v in bundle.__dict__.items():
        print(f"  {k}: {v}")
    return 0


@certs_app.command("show")
def certs_show(certs: CertsDir = "certs") -> int:
    """List certificates and keys with expiry."""
    from fedseek.ops import pki

    try:
        print(pki.format_show(pki.show(Path(certs))))
    except pki.PkiError as exc:
        return _pki_error(exc)
    return 0


def _key_shape(scenario: str | None, input_shape: str | None, num_classes: int | None) -> tuple[tuple[int, ...], int] | None:
    """The model's input shape and classes, from a scenario's dataset or given; None if neither."""
    if scenario:
        from fedseek.config import load_scenario
        from fedseek.data import load_builtin

        cfg = load_scenario(scenario)
        _, test = load_builtin(cfg.data.dataset, cfg.seed, test_fraction=cfg.data.test_fraction, **cfg.data.options)
        return tuple(test.input_shape), int(test.num_classes)
    if input_shape and num_classes:
        return tuple(int(d) for d in input_shape.split(",")), int(num_classes)
    return None


@watermark_app.command("keygen")
def watermark_keygen(
    out: Annotated[str, typer.Option("--out", help="Key file to write (0600).")],
    scenario: Annotated[str | None, typer.Option("--scenario", help="Take the input shape and classes from a scenario's dataset.")] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="E.g. 30 or 1,8,8.")] = None,
    num_classes: Annotated[int | None, typer.Option("--num-classes", help="Number of classes.")] = None,
    triggers: Annotated[int | None, typer.Option("--triggers", help="Trigger-set size (default: 100, or 200 for 2 classes).")] = None,
    model_id: Annotated[str, typer.Option("--model-id", help="An identifier stored in the key.")] = "",
    force: Force = False,
) -> int:
    """Make a secret watermark key and its public commitment."""
    from fedseek import watermark as wm

    shape = _key_shape(scenario, input_shape, num_classes)
    if shape is None:
        print("error: give --scenario, or --input-shape and --num-classes", file=sys.stderr)
        return 2
    key = wm.keygen(shape[0], shape[1], triggers, model_id=model_id)
    try:
        path = wm.save_key(key, out, force=force)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    digest = wm.commitment(key)
    pub = Path(str(path) + ".commitment.json")
    pub.write_text(json.dumps({"commitment": digest, **key.public_metadata()}, indent=2) + "\n")
    print(f"secret key: {path} (mode 0600; keep it private)")
    print(f"public commitment: {digest}  (also in {pub}; publish it to time-stamp your claim)")
    return 0


@watermark_app.command("verify")
def watermark_verify(
    key: Annotated[str, typer.Option("--key", help="The secret watermark key.")],
    model: Annotated[str, typer.Option("--model", help="model.pt (with model.json beside it).")],
    alpha: Annotated[float, typer.Option("--alpha", help="Significance level of the binomial test.")] = 1e-6,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> int:
    """Test a model file for the watermark (outputs only)."""
    from fedseek import watermark as wm

    try:
        res = wm.verify_file(model, key, alpha=alpha)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(f"matches {res.matches}/{res.n} triggers (chance 1/{res.num_classes}); "
              f"p-value {res.p_value:.3g} (exact binomial); alpha {res.alpha:g}")
        print(res.verdict)
    return 0


def register(app: typer.Typer) -> None:
    """Add the certs and watermark groups to the root command."""
    app.add_typer(certs_app, name="certs")
    app.add_typer(watermark_app, name="watermark")
