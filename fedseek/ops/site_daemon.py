"""A site daemon: a Flower SuperNode with the site's key and, by default, its gRPC site proxy.

With `transport: grpc` (default) the SuperNode talks HTTPS to the site proxy on 127.0.0.1
(fedseek.ops.transport.site_proxy), which carries every Fleet call to the coordinator endpoint over
gRPC with mutual TLS (the site's certificate, trusted by the federation CA only).

`fedseek site start|stop --config clients/sites/NAME.yaml`: the site's config, keys and data
are checked first (one error line, exit 2), then the SuperNode is started detached with a
pidfile in the site's state_dir; it reconnects on loss. A SuperNode the coordinator refuses
(unknown key, untrusted certificate, ...) exits, and `site start` says why from its log.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedseek.config import SiteConfig
from fedseek.ops.daemons import PROXY_PIDFILE, SUPERNODE_PIDFILE, DeployError, Pidfile, launch_detached, running_pidfile, stop_pidfile
from fedseek.ops.flower_control import flower_env
from fedseek.ops.processes import port_open


@dataclass
class SitePaths:
    """Where a site daemon keeps its state: ledger (the ClientApp's), Flower home, pidfile, log."""

    state_dir: Path
    flwr_home: Path
    pidfile: Path
    log: Path
    proxy_pidfile: Path
    proxy_log: Path
    loopback_dir: Path


def site_paths(cfg: SiteConfig) -> SitePaths:
    """The site's state paths (under state_dir)."""
    state = Path(str(cfg.state_dir))
    return SitePaths(state, state / "flwr-home", state / SUPERNODE_PIDFILE, state / "supernode.log",
                     state / PROXY_PIDFILE, state / "proxy.log", state / "proxy-tls")


def _check_ca(cfg: SiteConfig, where: str) -> None:
    from fedseek.ops import pki

    ca = Path(cfg.root_certificates)
    if not ca.is_file():
        raise DeployError(f"{where}: root_certificates {ca}: file not found (the federation's ca.crt from the site bundle)", 2)
    try:
        cert = pki.load_cert(ca)
    except pki.PkiError as exc:
        raise DeployError(f"{where}: root_certificates: {exc}", 2) from None
    if cert.not_valid_after_utc.timestamp() < time.time():
        raise DeployError(f"{where}: root_certificates {ca}: the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}", 2)


def _check_key(cfg: SiteConfig, where: str) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_path = Path(cfg.auth_private_key)
    if not key_path.is_file():
        raise DeployError(f"{where}: auth_private_key {key_path}: file not found (the node key from `fedseek certs request`)", 2)
    try:
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise DeployError(f"{where}: auth_private_key {key_path}: cannot read ({exc.strerror})", 2) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DeployError(f"{where}: auth_private_key {key_path} is not an unencrypted OpenSSH private key", 2) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{where}: auth_private_key {key_path} must be an ECDSA key on a NIST curve", 2)


def _check_site_cert(cfg: SiteConfig, where: str) -> None:
    """The site certificate: from the federation CA, unexpired, naming this site, matching tls_private_key."""
    from fedseek.ops import pki
    from fedseek.ops.pki.keys import same_public_key

    cert_path, key_path = Path(str(cfg.tls_certificate)), Path(str(cfg.tls_private_key))
    for what, p in (("tls_certificate", cert_path), ("tls_private_key", key_path)):
        if not p.is_file():
            raise DeployError(f"{where}: {what} {p}: file not found (`fedseek certs request {cfg.name}` makes the key; "
                              f"the coordinator's `fedseek certs sign` the certificate)", 2)
    try:
        pki.verify_chain(Path(cfg.root_certificates), cert_path)
        cert, key = pki.load_cert(cert_path), pki.load_private_key(key_path)
    except pki.PkiError as exc:
        raise DeployError(f"{where}: tls_certificate: {exc} (ask the coordinator for `fedseek certs renew {cfg.name}`)", 2) from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(pki_common_name())]
    if names != [cfg.name]:
        raise DeployError(f"{where}: tls_certificate {cert_path} names {names}, not this site {cfg.name!r}", 2)
    if not same_public_key(key.public_key(), cert.public_key()):
        raise DeployError(f"{where}: tls_private_key {key_path} does not belong to tls_certificate {cert_path}", 2)


def pki_common_name() -> Any:
    """The X.509 common-name OID (site certificates carry the site's name there)."""
    from cryptography.x509.oid import NameOID

    return NameOID.COMMON_NAME


def validate_site(cfg: SiteConfig, config_path: Path) -> Any:
    """Check the CA cert, the site key and the data (loaded once) before starting anything; DeployError exit 2."""
    from fedseek.data import DataError
    from fedseek.data.preprocess import check_bounds
    from fedseek.data.site_data import load_site_data

    where = f"{config_path}"
    _check_ca(cfg, where)
    _check_key(cfg, where)
    if cfg.transport == "grpc":
        _check_site_cert(cfg, where)
    pol = cfg.privacy
    try:
        data = load_site_data(cfg)
        if cfg.data.preprocessing is not None and cfg.data.label_column:
            check_bounds(cfg.data.preprocessing, data, cfg.data.label_column, private=pol is not None and pol.enabled)
    except (DataError, ValueError, OSError) as exc:
        raise DeployError(f"{where}: data: {' '.join(str(exc).split())}", 2) from None
    if pol is not None and pol.enabled and pol.delta >= 1.0 / max(1, len(data.y)):
        raise DeployError(f"{where}: privacy.delta {pol.delta:g} must be below 1/n = {1.0 / len(data.y):.3g} "
                          f"for this site's {len(data.y)} records", 2)
    return data


def supernode_command(cfg: SiteConfig, config_path: Path) -> list[str]:
    """The flower-supernode command line: the site key, the site config as node config, and either the site proxy
    on loopback (transport grpc, trusting the proxy's loopback CA) or the coordinator directly (federation CA)."""
    if cfg.transport == "grpc":
        superlink, roots = f"127.0.0.1:{cfg.proxy_port}", str(site_paths(cfg).loopback_dir / "loopback-ca.crt")
    else:
        superlink, roots = cfg.coordinator, cfg.root_certificates
    import sys

    cmd = [sys.executable, "-m", "fedseek.ops.site_runner", "supernode", "--poll-s", str(cfg.poll_interval_s), "--",
           "--superlink", superlink,
           "--root-certificates", roots,
           "--auth-supernode-private-key", cfg.auth_private_key,
           "--node-config", f"site-config={json.dumps(str(config_path))}",
           "--host", "127.0.0.1", "--port", str(cfg.runtime_port)]
    if cfg.max_retries is not None:
        cmd += ["--max-retries", str(cfg.max_retries)]
    if cfg.max_wait_s is not None:
        cmd += ["--max-wait-time", str(cfg.max_wait_s)]
    return cmd


_HINTS = (
    ("PERMISSION_DENIED", ("the coordinator endpoint refused this site: its certificate is revoked, not listed in sites, "
                          "or names another site than its node key (see proxy.log)")),
    ("2004", "the coordinator does not know this site's key: the coordinator operator must list it in sites and restart/register"),
    ("2001", "the coordinator requires registered site keys"),
    ("CERTIFICATE_VERIFY_FAILED", "TLS: the coordinator's certificate is not signed by root_certificates, or it has expired"),
    ("certificate has expired", "TLS: the coordinator's certificate has expired"),
    ("Server disconnected", "TLS handshake failed (plaintext client, or a non-TLS server)"),
    ("wrong version number", "TLS handshake failed (the coordinator does not speak TLS?)"),
)


def refusal_reason(log_text: str) -> str:
    """The reason a SuperNode gave up, from its log: Flower's error line plus a hint."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    start = max((i for i, ln in enumerate(lines) if "Exit Code:" in ln or "fedseek starts:" in ln), default=0)
    tail_lines = lines[start:]
    detail = next((ln for ln in tail_lines if re.search(r"\[code: \d+\]|SSL|certificate|disconnected|refused|Exit Code", ln, re.I)
                   and "Exit Code" not in ln), "")
    if not detail:
        detail = next((ln for ln in reversed(tail_lines) if "ERROR" in ln), tail_lines[-1] if tail_lines else "no log output")
    hint = next((h for key, h in _HINTS if key.lower() in "\n".join(tail_lines).lower()), "")
    return detail + (f" ({hint})" if hint else "")


def _endpoint_refusal(proxy_log: Path, offset: int) -> str | None:
    """The coordinator endpoint's reason for refusing this site, from the proxy's log (None if it did not refuse)."""
    for line in reversed(_read_from(proxy_log, offset).splitlines()):
        m = re.search(r"PERMISSION_DENIED \((.*)\) -> HTTP", line)
        if m:
            return m.group(1)
    return None


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def start_site(cfg: SiteConfig, config_path: Path, console: Console, *, wait_s: float = 30.0) -> str:
    """Validate, start the SuperNode detached and wait up to `wait_s` for it to join; returns 'online' or 'connecting'.

    A SuperNode that gives up (refused key, untrusted certificate, ...) raises DeployError (exit 1) with its reason.
    """
    config_path = Path(config_path).resolve()
    validate_site(cfg, config_path)
    paths = site_paths(cfg)
    if cfg.transport == "grpc":  # (re)start the proxy first, also under a running SuperNode that lost it
        paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        start_proxy(cfg, console)
    pf = running_pidfile(paths.pidfile)
    if pf is not None:
        console.print(f"site {cfg.name} already running (pid {pf.pid})")
        return "running"
    if port_open("127.0.0.1", cfg.runtime_port):
        raise DeployError(f"{config_path}: runtime_port {cfg.runtime_port} is in use on 127.0.0.1 "
                          f"(every site on one host needs its own runtime_port)", 2)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    offset = paths.log.stat().st_size if paths.log.exists() else 0
    proxy_offset = paths.proxy_log.stat().st_size if paths.proxy_log.exists() else 0
    proc, pf = launch_detached(supernode_command(cfg, config_path), supernode_env(cfg), paths.log, paths.pidfile, cfg.coordinator)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        text = _read_from(paths.log, offset)
        m = re.search(r"SuperNode ID: (\d+)", text)
        if m:
            console.print(f"site {cfg.name} online as node {m.group(1)} (pid {pf.pid}); log {paths.log}")
            return "online"
        if proc.poll() is not None:
            paths.pidfile.unlink(missing_ok=True)
            refused = _endpoint_refusal(paths.proxy_log, proxy_offset) if cfg.transport == "grpc" else None
            if refused:  # the endpoint's reason is in the proxy's log, not the SuperNode's
                raise DeployError(f"site {cfg.name}: refused by the coordinator endpoint {cfg.coordinator}: {refused}; "
                                  f"log {paths.proxy_log}")
            raise DeployError(f"site {cfg.name}: refused by {cfg.coordinator} (SuperNode exit {proc.returncode}): "
                              f"{refusal_reason(text)}; log {paths.log}")
        time.sleep(0.3)
    limits = "without limit" if cfg.max_retries is None and cfg.max_wait_s is None else "within its limits"
    console.print(f"site {cfg.name} started (pid {pf.pid}), still connecting to {cfg.coordinator}; it retries {limits}; log {paths.log}")
    return "connecting"


def supernode_env(cfg: SiteConfig) -> dict[str, str]:
    """Flower's environment for the SuperNode; with warm_clientapp, state_dir/bin (the warm SuperExec shim) first on PATH."""
    import os

    from fedseek.ops.site_runner import write_superexec_shim

    paths = site_paths(cfg)
    env = flower_env(paths.flwr_home)
    if cfg.warm_clientapp:
        env["PATH"] = str(write_superexec_shim(paths.state_dir / "bin").parent) + os.pathsep + env["PATH"]
    return env


def proxy_command(cfg: SiteConfig) -> list[str]:
    """The site proxy's command line (loopback HTTPS for the SuperNode -> gRPC with mutual TLS to the coordinator)."""
    import sys

    return [sys.executable, "-m", "fedseek.ops.transport.site_proxy", "--port", str(cfg.proxy_port),
            "--coordinator", cfg.coordinator, "--cafile", cfg.root_certificates, "--certfile", str(cfg.tls_certificate),
            "--keyfile", str(cfg.tls_private_key), "--loopback-dir", str(site_paths(cfg).loopback_dir),
            "--max-message-bytes", str(cfg.max_message_mb * 1024 * 1024)]


def start_proxy(cfg: SiteConfig, console: Console, *, wait_s: float = 30.0) -> None:
    """Start the site proxy detached (state_dir/proxy.pid), or find it running, and wait for its loopback port."""
    from fedseek.ops.processes import wait_for_port
    from fedseek.ops.transport.loopback_tls import ensure_loopback_tls

    paths = site_paths(cfg)
    pf = running_pidfile(paths.proxy_pidfile)
    if pf is not None:
        return
    if port_open("127.0.0.1", cfg.proxy_port):
        raise DeployError(f"proxy_port {cfg.proxy_port} is in use on 127.0.0.1 (every site on one host needs its own proxy_port)", 2)
    ensure_loopback_tls(paths.loopback_dir)  # before the SuperNode starts: it must find the loopback CA
    proc, pf = launch_detached(proxy_command(cfg), flower_env(paths.flwr_home), paths.proxy_log, paths.proxy_pidfile,
                               f"127.0.0.1:{cfg.proxy_port}")
    try:
        wait_for_port("127.0.0.1", cfg.proxy_port, wait_s, proc)
    except (RuntimeError, TimeoutError) as exc:
        stop_pidfile(paths.proxy_pidfile)
        raise DeployError(f"site {cfg.name}: the site proxy did not start ({exc}); see {paths.proxy_log}") from None
    console.print(f"site {cfg.name}: proxy (pid {pf.pid}) on 127.0.0.1:{cfg.proxy_port} -> {cfg.coordinator} over gRPC with mutual TLS")


def stop_site(cfg: SiteConfig) -> Pidfile | None:
    """Stop the site's SuperNode (and any ClientApp it runs), then its proxy; None if the SuperNode was not running."""
    paths = site_paths(cfg)
    pf = stop_pidfile(paths.pidfile)
    stop_pidfile(paths.proxy_pidfile)
    return pf
