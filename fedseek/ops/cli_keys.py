"""Commands for key material: `certs init|request|sign|renew|revoke|add-site|show` and `watermark keygen|verify`."""

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
    """One-machine shortcut: make a site's keys here, sign them and write its bundle (between organisations use request + sign)."""
    from fedseek.ops import pki

    try:
        bundle = pki.add_site(Path(certs), name, coordinator, force=force)
    except pki.PkiError as exc:
        return _pki_error(exc)
    print(f"site bundle for {name}:")
    for k, v in bundle.__dict__.items():
        print(f"  {k}: {v}")
    return 0


@certs_app.command("request")
def certs_request(
    name: Annotated[str, typer.Argument(help="This site's name (as the coordinator lists it).")],
    out: Annotated[str, typer.Option("--out", help="Directory for the site's keys and request.")] = "certs/site",
    force: Force = False,
) -> int:
    """At the site: make this site's keys (they never leave it) and a certificate request for the coordinator."""
    from fedseek.ops import pki
    from fedseek.ops.pki.requests import request_site

    try:
        req = request_site(Path(out), name, force=force)
    except pki.PkiError as exc:
        return _pki_error(exc)
    print(f"site {name}: keys and request in {Path(out)}")
    print(f"  keep here (private, 0600): {req.node_key}  {req.tls_key}")
    print(f"  send to the coordinator:   {req.csr}  {req.node_pub}")
    print(f"  node key fingerprint (read it to the coordinator operator out of band): {req.fingerprint}")
    return 0


@certs_app.command("sign")
def certs_sign(
    csr: Annotated[str, typer.Argument(help="The site's NAME.csr.")],
    pub: Annotated[str, typer.Option("--pub", help="The site's node public key NAME.pub.")],
    certs: CertsDir = "certs",
    days: Annotated[int, typer.Option("--days", help="Validity of the site certificate in days (short-lived).")] = 30,
    force: Force = False,
) -> int:
    """At the coordinator: check a site's request and issue its certificate (only public keys are kept)."""
    from fedseek.ops import pki
    from fedseek.ops.pki.keys import ssh_fingerprint
    from fedseek.ops.pki.requests import sign_request

    try:
        signed = sign_request(Path(certs), Path(csr), Path(pub), days=days, force=force)
        fingerprint = ssh_fingerprint(signed.node_pub.read_bytes())
    except pki.PkiError as exc:
        return _pki_error(exc)
    print(f"site {signed.name}: certificate serial {signed.serial}, valid until {signed.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"  node key fingerprint {fingerprint}: compare it with the site's before you list the site")
    print(f"  send back to the site: {signed.cert}  {signed.ca}")
    print(f"  list it in the coordinator config: sites: [{{name: {signed.name}, public_key: {signed.node_pub}}}]")
    return 0


@certs_app.command("renew")
def certs_renew(
    name: Annotated[str, typer.Argument(help="The site's name.")],
    certs: CertsDir = "certs",
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 30,
) -> int:
    """At the coordinator: a fresh certificate for a site's kept request (the site keeps its keys)."""
    from fedseek.ops import pki
    from fedseek.ops.pki.requests import renew_site

    try:
        signed = renew_site(Path(certs), name, days=days)
    except pki.PkiError as exc:
        return _pki_error(exc)
    print(f"site {name}: new certificate serial {signed.serial}, valid until {signed.not_after:%Y-%m-%d %H:%M} UTC: "
          f"send {signed.cert} to the site (it restarts its proxy: `fedseek site start`)")
    return 0


@certs_app.command("revoke")
def certs_revoke(
    name: Annotated[str, typer.Argument(help="The site's name.")],
    certs: CertsDir = "certs",
) -> int:
    """At the coordinator: revoke every certificate issued to a site; the running endpoint refuses it at once."""
    from fedseek.ops import pki
    from fedseek.ops.pki.requests import revoke_site

    try:
        serials = revoke_site(Path(certs), name)
    except pki.PkiError as exc:
        return _pki_error(exc)
    print(f"site {name}: revoked {len(serials)} certificate(s) {', '.join(serials) or '(already revoked)'}; "
          f"the endpoint refuses its calls from now on (no restart). Remove it from sites to unregister its node key.")
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
        from fedseek.data.scenario_data import scenario_shapes

        _, shaped = scenario_shapes(load_scenario(scenario))
        return tuple(shaped.input_shape), int(shaped.num_classes)
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
