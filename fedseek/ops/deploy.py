"""Deployment: the coordinator service (Flower SuperLink over TLS with site keys) and site daemons (SuperNodes).

* `fedseek coordinator start|stop|status --config server/coordinator.yaml`: a SuperLink with
  TLS (`certs_dir`: ca.crt, coordinator.crt/.key), SuperNode authentication, a sqlite
  database, detached in its own session with a pidfile in `superlink.state_dir`; every
  allowed site's public key is registered through the Control API at start.
* `fedseek site start|stop --config clients/sites/NAME.yaml`: the site's config, keys and
  data are checked first (one error line, exit 2), then a SuperNode is started detached,
  trusting only the federation's CA and signing with the site's key; it reconnects on loss.
* `fedseek run --config server/coordinator.yaml`: submits the fedseek app with the
  coordinator config, follows it (shared with `fedseek simulate`) and fails unless the run
  ends `finished:completed`.

Processes are stopped by pidfile pid + start time (a recycled pid is never hit), never by name.
What Flower 1.41 leaves open (the Control API shares the Fleet port) is in docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedseek.config import CoordinatorConfig, SiteConfig, load_coordinator
from fedseek.ops.flower_control import ControlClient, flower_env, flwr_bin, submit_run, write_connection
from fedseek.ops.follow import RunError, follow_run, print_summary, tail
from fedseek.ops.processes import ProcessTree, is_running, start_process, start_time, stop_detached, wait_for_port

CONNECTION = "fedseek"
SUPERLINK_PIDFILE = "superlink.pid"
SUPERNODE_PIDFILE = "supernode.pid"
GATEWAY_PIDFILE = "gateway.pid"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class DeployError(RuntimeError):
    """A deployment step failed; one line for the operator, with the CLI exit code (2 = fix the config)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        """Keep the message and the exit code the CLI should return."""
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------ pidfiles


@dataclass
class Pidfile:
    """A detached daemon: pid + kernel start time (so a recycled pid is never mistaken for it)."""

    pid: int
    started: int
    cmd: list[str]
    address: str = ""
    log: str = ""

    @classmethod
    def read(cls, path: Path) -> Pidfile | None:
        """The pidfile at `path`, or None if absent or unreadable."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        """Write atomically (0644)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)) + "\n")
        tmp.replace(path)

    def running(self) -> bool:
        """True while the very process we started is alive."""
        return is_running(self.pid, self.started)


def _launch(cmd: list[str], env: dict[str, str], log_path: Path, pidfile: Path, address: str) -> tuple[subprocess.Popen, Pidfile]:
    """Start `cmd` detached (own session, stdin closed, output appended to `log_path`) and write its pidfile."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} fedseek starts: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=str(pidfile.parent), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    pf = Pidfile(proc.pid, start_time(proc.pid) or 0, cmd, address, str(log_path))
    pf.write(pidfile)
    return proc, pf


def _stop_pidfile(path: Path, timeout_s: float = 20.0) -> Pidfile | None:
    """Stop the daemon a pidfile names (whole tree) and remove the pidfile; None if it was not running."""
    pf = Pidfile.read(path)
    if pf is None:
        return None
    was_running = pf.running()
    if was_running:
        stop_detached(pf.pid, pf.started, timeout_s)
    path.unlink(missing_ok=True)
    return pf if was_running else None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ coordinator


@dataclass
class CoordinatorPaths:
    """Where a coordinator keeps its state (all under superlink.state_dir) and its TLS material."""

    state_dir: Path
    flwr_home: Path
    pidfile: Path
    stdout_log: Path
    ca: Path
    cert: Path
    key: Path


def coordinator_paths(cfg: CoordinatorConfig) -> CoordinatorPaths:
    """The coordinator's state and certificate paths (config paths are already absolute)."""
    state = Path(cfg.superlink.state_dir)
    certs = Path(cfg.superlink.certs_dir)
    from fedseek.ops import pki

    return CoordinatorPaths(state, state / "flwr-home", state / SUPERLINK_PIDFILE, state / "superlink.out",
                            certs / pki.CA_CRT, certs / pki.COORDINATOR_CRT, certs / pki.COORDINATOR_KEY)


def admin_host(cfg: CoordinatorConfig) -> str:
    """The host the operator's CLI uses (loopback when the SuperLink binds every interface)."""
    h = cfg.superlink.host
    return "127.0.0.1" if h in WILDCARD_HOSTS else h


def admin_address(cfg: CoordinatorConfig) -> str:
    """host:port of the Control API as this machine's CLI reaches it."""
    h = admin_host(cfg)
    return f"[{h}]:{cfg.superlink.port}" if ":" in h else f"{h}:{cfg.superlink.port}"


def check_coordinator_certs(cfg: CoordinatorConfig, paths: CoordinatorPaths) -> None:
    """Refuse to start on missing, mismatched or expired TLS material (DeployError, exit 2)."""
    from fedseek.ops import pki

    for what, p in (("CA certificate", paths.ca), ("coordinator certificate", paths.cert), ("coordinator key", paths.key)):
        if not p.is_file():
            raise DeployError(f"{what} {p} not found: run `fedseek certs init --out {paths.ca.parent}` "
                              f"(or set superlink.certs_dir)", 2)
    try:
        pki.verify_chain(paths.ca, paths.cert, hostname=admin_host(cfg))
        key = pki.load_private_key(paths.key)
    except pki.PkiError as exc:
        raise DeployError(f"coordinator TLS: {exc} (renew with `fedseek certs` from the same CA)", 2) from None
    if key.public_key().public_numbers() != pki.load_cert(paths.cert).public_key().public_numbers():
        raise DeployError(f"coordinator TLS: {paths.key} does not belong to {paths.cert}", 2)


def _spki(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_site_keys(cfg: CoordinatorConfig) -> dict[str, bytes]:
    """Every allowed site's public key (DER SubjectPublicKeyInfo) from its OpenSSH .pub file; DeployError exit 2."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys: dict[str, bytes] = {}
    for site in cfg.sites:
        p = Path(site.public_key)
        try:
            key = serialization.load_ssh_public_key(p.read_bytes())
        except OSError as exc:
            raise DeployError(f"site {site.name}: public key {p}: {exc.strerror or exc}", 2) from None
        except (ValueError, UnsupportedAlgorithm):
            raise DeployError(f"site {site.name}: {p} is not an OpenSSH public key (fedseek certs add-site writes NAME.pub)", 2) from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise DeployError(f"site {site.name}: {p} must be an ECDSA key on a NIST curve (Flower's SuperNode auth)", 2)
        keys[site.name] = _spki(key)
    return keys


def _node_spki(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    try:
        return _spki(serialization.load_pem_public_key(pem))
    except ValueError:
        return b""


def _quiet_client(flwr_home: Path) -> ControlClient:
    """A Control API client without Flower's "Using SuperLink: ..." line on stdout (it would break --json)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return ControlClient(flwr_home, CONNECTION)


def _control(paths: CoordinatorPaths, attempts: int = 10) -> ControlClient:
    """A Control API client; retried briefly while a just-started SuperLink comes up."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            client = _quiet_client(paths.flwr_home)
            client.nodes()
            return client
        except Exception as exc:  # noqa: BLE001 - Flower raises several kinds while starting
            last = exc
            time.sleep(1.0)
    raise DeployError(f"the coordinator's Control API does not answer: {last}")


def register_sites(cfg: CoordinatorConfig, paths: CoordinatorPaths, keys: dict[str, bytes], console: Console) -> list[str]:
    """Register each allowed site's key (`flwr supernode register`); already registered is fine. Returns problems."""
    env = flower_env(paths.flwr_home)
    client = _control(paths)
    try:
        nodes = client.nodes()
    finally:
        client.close()
    by_key = {_node_spki(n["public_key"]): n for n in nodes if n["public_key"]}
    problems: list[str] = []
    for site in cfg.sites:
        known = by_key.get(keys[site.name])
        if known is not None:
            if known["status"] == "unregistered":
                problems.append(f"site {site.name}: its key was unregistered and Flower refuses to register a key twice: "
                                f"issue a new one (fedseek certs add-site {site.name} --force) and update sites[].public_key")
            else:
                console.print(f"site {site.name}: registered (node {known['node_id']}, {known['status']})")
            continue
        res = subprocess.run([flwr_bin("flwr"), "supernode", "register", site.public_key, CONNECTION, "--name", site.name,
                              "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
        payload = _last_json(res.stdout)
        if payload and payload.get("success"):
            console.print(f"site {site.name}: key registered (node {payload.get('node-id')})")
        else:
            detail = (payload or {}).get("error-message") or (res.stderr or res.stdout).strip()
            problems.append(f"site {site.name}: registration failed: {_one_line(detail)}")
    allowed = set(keys.values())
    for n in nodes:
        if n["status"] != "unregistered" and _node_spki(n["public_key"]) not in allowed:
            problems.append(f"node {n['node_id']} ({n['name'] or 'no name'}) is registered but not in sites: "
                            f"revoke it with `FLWR_HOME={paths.flwr_home} flwr supernode unregister {n['node_id']} {CONNECTION}`")
    return problems


def _last_json(text: str) -> dict | None:
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Using SuperLink")]
    return " ".join(lines)[-400:] or "(no output)"


def superlink_command(cfg: CoordinatorConfig, paths: CoordinatorPaths) -> list[str]:
    """The flower-superlink command line: TLS, site authentication, persistent database, no runtime pip."""
    sl = cfg.superlink
    return [flwr_bin("flower-superlink"),
            "--ssl-certfile", str(paths.cert), "--ssl-keyfile", str(paths.key), "--ssl-ca-certfile", str(paths.ca),
            "--enable-supernode-auth",
            "--database", str(sl.database),
            "--host", sl.host, "--port", str(sl.port),
            "--disable-runtime-dependency-installation",
            "--log-file", str(sl.log_file)]


def launch_superlink(cfg: CoordinatorConfig, *, wait_s: float = 60.0) -> Pidfile:
    """Start the SuperLink detached with a pidfile and wait for its port (no certificate checks, no registration)."""
    paths = coordinator_paths(cfg)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    Path(str(cfg.superlink.database)).parent.mkdir(parents=True, exist_ok=True)
    write_connection(paths.flwr_home, CONNECTION, admin_address(cfg), root_certificates=paths.ca)
    if _port_open(admin_host(cfg), cfg.superlink.port):
        raise DeployError(f"port {cfg.superlink.port} on {admin_host(cfg)} is already in use (another coordinator?)")
    address = f"{cfg.superlink.host}:{cfg.superlink.port}"
    proc, pf = _launch(superlink_command(cfg, paths), flower_env(paths.flwr_home), paths.stdout_log, paths.pidfile, address)
    try:
        wait_for_port(admin_host(cfg), cfg.superlink.port, wait_s, proc)
    except (RuntimeError, TimeoutError) as exc:
        _stop_pidfile(paths.pidfile)
        raise DeployError(f"the SuperLink did not start ({exc}); see {paths.stdout_log}:\n{tail(paths.stdout_log)}") from None
    return pf


def gateway_command(cfg: CoordinatorConfig, paths: CoordinatorPaths) -> list[str]:
    """The Fleet-only gateway's command line (public TLS listener -> loopback SuperLink)."""
    gw = cfg.gateway
    assert gw is not None
    gh = f"[{gw.host}]" if ":" in gw.host else gw.host
    return [sys.executable, "-m", "fedseek.ops.gateway", "--listen", f"{gh}:{gw.port}", "--upstream", admin_address(cfg),
            "--certfile", str(paths.cert), "--keyfile", str(paths.key), "--cafile", str(paths.ca),
            "--max-body-mb", str(gw.max_body_mb)]


def launch_gateway(cfg: CoordinatorConfig, *, wait_s: float = 30.0) -> Pidfile:
    """Start the gateway detached with its pidfile (state_dir/gateway.pid) and wait for its port."""
    paths = coordinator_paths(cfg)
    gw = cfg.gateway
    assert gw is not None
    probe = "127.0.0.1" if gw.host in WILDCARD_HOSTS else gw.host
    if _port_open(probe, gw.port):
        raise DeployError(f"gateway port {gw.port} on {gw.host} is already in use")
    proc, pf = _launch(gateway_command(cfg, paths), flower_env(paths.flwr_home), paths.state_dir / "gateway.log",
                       paths.state_dir / GATEWAY_PIDFILE, f"{gw.host}:{gw.port}")
    try:
        wait_for_port(probe, gw.port, wait_s, proc)
    except (RuntimeError, TimeoutError) as exc:
        _stop_pidfile(paths.state_dir / GATEWAY_PIDFILE)
        raise DeployError(f"the gateway did not start ({exc}); see {paths.state_dir / 'gateway.log'}") from None
    return pf


def start_coordinator(cfg: CoordinatorConfig, console: Console, *, wait_s: float = 60.0) -> list[str]:
    """Check the TLS material and site keys, start the SuperLink (or find it running), register the allowed sites.

    Returns registration problems (one line each); raises DeployError (exit 2) for bad certificates or keys.
    """
    paths = coordinator_paths(cfg)
    check_coordinator_certs(cfg, paths)
    keys = load_site_keys(cfg)
    pf = Pidfile.read(paths.pidfile)
    if pf is not None and pf.running():
        console.print(f"coordinator already running (pid {pf.pid}) on {pf.address}")
        write_connection(paths.flwr_home, CONNECTION, admin_address(cfg), root_certificates=paths.ca)
    else:
        pf = launch_superlink(cfg, wait_s=wait_s)
        console.print(f"coordinator started (pid {pf.pid}) on {pf.address} over TLS, site authentication on; "
                      f"database {cfg.superlink.database}")
        if cfg.superlink.host in WILDCARD_HOSTS:
            console.print("[yellow]warning:[/] the SuperLink listens on every interface: its Control API (run, stop, "
                          "register, logs) is reachable by anyone who can reach the Fleet API. Use a gateway: "
                          "see docs/deployment.md.")
    if cfg.gateway is not None:
        gpf = Pidfile.read(paths.state_dir / GATEWAY_PIDFILE)
        if gpf is not None and gpf.running():
            console.print(f"gateway already running (pid {gpf.pid}) on {gpf.address}")
        else:
            gpf = launch_gateway(cfg)
            console.print(f"gateway started (pid {gpf.pid}) on {gpf.address}: sites connect here; only the Fleet API "
                          f"is forwarded, the Control API stays on {admin_address(cfg)}")
    return register_sites(cfg, paths, keys, console)


def stop_coordinator(cfg: CoordinatorConfig) -> Pidfile | None:
    """Stop the gateway (if any), then the SuperLink and everything it spawned; None if the SuperLink was not running."""
    paths = coordinator_paths(cfg)
    _stop_pidfile(paths.state_dir / GATEWAY_PIDFILE)
    return _stop_pidfile(paths.pidfile)


def coordinator_status(cfg: CoordinatorConfig) -> dict[str, Any]:
    """Whether the SuperLink runs, its address, and each registered site's node id and status (online/offline/...)."""
    paths = coordinator_paths(cfg)
    pf = Pidfile.read(paths.pidfile)
    out: dict[str, Any] = {"running": bool(pf and pf.running()), "pid": pf.pid if pf else None,
                           "address": f"{cfg.superlink.host}:{cfg.superlink.port}", "database": cfg.superlink.database,
                           "sites": [], "other_nodes": []}
    if cfg.gateway is not None:
        gpf = Pidfile.read(paths.state_dir / GATEWAY_PIDFILE)
        out["gateway"] = {"running": bool(gpf and gpf.running()), "pid": gpf.pid if gpf else None,
                          "address": f"{cfg.gateway.host}:{cfg.gateway.port}"}
    if not out["running"]:
        return out
    try:
        keys = load_site_keys(cfg)
    except DeployError as exc:
        out["error"] = str(exc)
        keys = {}
    client = _control(paths, attempts=3)
    try:
        nodes = client.nodes()
    finally:
        client.close()
    by_key = {_node_spki(n["public_key"]): n for n in nodes}
    for site in cfg.sites:
        n = by_key.get(keys.get(site.name, b"-"))
        out["sites"].append({"name": site.name, "node_id": n["node_id"] if n else None,
                             "status": n["status"] if n else "not registered"})
    allowed = set(keys.values())
    out["other_nodes"] = [{"node_id": n["node_id"], "name": n["name"], "status": n["status"]}
                          for n in nodes if _node_spki(n["public_key"]) not in allowed]
    return out


# ------------------------------------------------------------------ sites


@dataclass
class SitePaths:
    """Where a site daemon keeps its state: ledger (the ClientApp's), Flower home, pidfile, log."""

    state_dir: Path
    flwr_home: Path
    pidfile: Path
    log: Path


def site_paths(cfg: SiteConfig) -> SitePaths:
    """The site's state paths (under state_dir)."""
    state = Path(str(cfg.state_dir))
    return SitePaths(state, state / "flwr-home", state / SUPERNODE_PIDFILE, state / "supernode.log")


def validate_site(cfg: SiteConfig, config_path: Path) -> Any:
    """Check the CA cert, the site key and the data (loaded once) before starting anything; DeployError exit 2."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedseek.data import DataError
    from fedseek.ops import pki
    from fedseek.runtime.site import load_site_data

    where = f"{config_path}"
    ca = Path(cfg.root_certificates)
    if not ca.is_file():
        raise DeployError(f"{where}: root_certificates {ca}: file not found (the federation's ca.crt from the site bundle)", 2)
    try:
        cert = pki.load_cert(ca)
    except pki.PkiError as exc:
        raise DeployError(f"{where}: root_certificates: {exc}", 2) from None
    if cert.not_valid_after_utc.timestamp() < time.time():
        raise DeployError(f"{where}: root_certificates {ca}: the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}", 2)
    key_path = Path(cfg.auth_private_key)
    if not key_path.is_file():
        raise DeployError(f"{where}: auth_private_key {key_path}: file not found (the site key from `fedseek certs add-site`)", 2)
    try:
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise DeployError(f"{where}: auth_private_key {key_path}: cannot read ({exc.strerror})", 2) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DeployError(f"{where}: auth_private_key {key_path} is not an unencrypted OpenSSH private key", 2) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{where}: auth_private_key {key_path} must be an ECDSA key on a NIST curve", 2)
    try:
        data = load_site_data(cfg)
    except (DataError, ValueError, OSError) as exc:
        raise DeployError(f"{where}: data: {' '.join(str(exc).split())}", 2) from None
    pol = cfg.privacy
    if pol is not None and pol.enabled and pol.delta >= 1.0 / max(1, len(data.y)):
        raise DeployError(f"{where}: privacy.delta {pol.delta:g} must be below 1/n = {1.0 / len(data.y):.3g} "
                          f"for this site's {len(data.y)} records", 2)
    return data


def supernode_command(cfg: SiteConfig, config_path: Path) -> list[str]:
    """The flower-supernode command line: TLS with the federation CA, the site key, the site config as node config."""
    cmd = [flwr_bin("flower-supernode"),
           "--superlink", cfg.coordinator,
           "--root-certificates", cfg.root_certificates,
           "--auth-supernode-private-key", cfg.auth_private_key,
           "--node-config", f"site-config={json.dumps(str(config_path))}",
           "--host", "127.0.0.1", "--port", str(cfg.runtime_port)]
    if cfg.max_retries is not None:
        cmd += ["--max-retries", str(cfg.max_retries)]
    if cfg.max_wait_s is not None:
        cmd += ["--max-wait-time", str(cfg.max_wait_s)]
    return cmd


_HINTS = (
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


def start_site(cfg: SiteConfig, config_path: Path, console: Console, *, wait_s: float = 30.0) -> str:
    """Validate, start the SuperNode detached and wait up to `wait_s` for it to join; returns 'online' or 'connecting'.

    A SuperNode that gives up (refused key, untrusted certificate, ...) raises DeployError (exit 1) with its reason.
    """
    config_path = Path(config_path).resolve()
    validate_site(cfg, config_path)
    paths = site_paths(cfg)
    pf = Pidfile.read(paths.pidfile)
    if pf is not None and pf.running():
        console.print(f"site {cfg.name} already running (pid {pf.pid})")
        return "running"
    if _port_open("127.0.0.1", cfg.runtime_port):
        raise DeployError(f"{config_path}: runtime_port {cfg.runtime_port} is in use on 127.0.0.1 "
                          f"(every site on one host needs its own runtime_port)", 2)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    offset = paths.log.stat().st_size if paths.log.exists() else 0
    proc, pf = _launch(supernode_command(cfg, config_path), flower_env(paths.flwr_home), paths.log, paths.pidfile, cfg.coordinator)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        text = _read_from(paths.log, offset)
        m = re.search(r"SuperNode ID: (\d+)", text)
        if m:
            console.print(f"site {cfg.name} online as node {m.group(1)} (pid {pf.pid}); log {paths.log}")
            return "online"
        if proc.poll() is not None:
            paths.pidfile.unlink(missing_ok=True)
            raise DeployError(f"site {cfg.name}: refused by {cfg.coordinator} (SuperNode exit {proc.returncode}): "
                              f"{refusal_reason(text)}; log {paths.log}")
        time.sleep(0.3)
    console.print(f"site {cfg.name} started (pid {pf.pid}), still connecting to {cfg.coordinator}; it retries "
                  f"{'without limit' if cfg.max_retries is None and cfg.max_wait_s is None else 'within its limits'}; log {paths.log}")
    return "connecting"


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def stop_site(cfg: SiteConfig) -> Pidfile | None:
    """Stop the site's SuperNode (and any ClientApp it runs); None if it was not running."""
    return _stop_pidfile(site_paths(cfg).pidfile)


# ------------------------------------------------------------------ runs


def run_federation(
    config_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    console: Console | None = None,
    timeout_s: float | None = None,
    on_round: Callable[[dict], None] | None = None,
) -> dict:
    """Submit the fedseek app to the running coordinator and follow it to its end; returns summary.json's content.

    Raises RunError unless the run ends finished:completed with a summary written.
    """
    from fedseek.ops.simulate import app_dir

    console = console or Console(stderr=True)
    config_path = Path(config_path).resolve()
    cfg = load_coordinator(config_path)
    paths = coordinator_paths(cfg)
    pf = Pidfile.read(paths.pidfile)
    host, port = admin_host(cfg), cfg.superlink.port
    if not (pf and pf.running()) and not _port_open(host, port):
        raise DeployError(f"the coordinator is not running on {admin_address(cfg)}: fedseek coordinator start --config {config_path}")
    out = Path(out_dir).resolve() if out_dir else Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.json", "metrics.jsonl", "audit.jsonl"):
        (out / stale).unlink(missing_ok=True)
    write_connection(paths.flwr_home, CONNECTION, admin_address(cfg), root_certificates=paths.ca)
    env = flower_env(paths.flwr_home)
    timeout_s = timeout_s or (cfg.node_wait_s + cfg.round_timeout_s * cfg.rounds + 300)
    run_log = out / "run.log"

    tracked = pf if (pf is not None and pf.running()) else None  # a SuperLink started by other means is not watched

    def alive() -> str | None:
        if tracked is not None and not tracked.running():
            return f"the coordinator (pid {tracked.pid}) exited; see {cfg.superlink.log_file}"
        return None

    t0 = time.time()
    console.print(f"[bold]fedseek[/] run [cyan]{cfg.name}[/] on {admin_address(cfg)}: {cfg.expected_sites} sites expected, "
                  f"{cfg.rounds} rounds, {cfg.strategy.name}")
    client: ControlClient | None = None
    run_id: int | None = None
    logs: ProcessTree | None = None
    with open(run_log, "ab") as run_log_fh:
        try:
            try:
                run_id = submit_run(app_dir(), CONNECTION, env, {"config-path": str(config_path), "out-dir": str(out),
                                                                   "config-kind": "coordinator"})
            except RuntimeError as exc:
                raise RunError(str(exc)) from None
            console.print(f"run {run_id} submitted; ServerApp log: {run_log}")
            logs = start_process([flwr_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=env, log=run_log_fh, name="flwr-log")
            client = _quiet_client(paths.flwr_home)
            status = follow_run(out, client, run_id, rounds=cfg.rounds, sites=int(cfg.expected_sites or 1), console=console,
                                timeout_s=timeout_s, on_round=on_round, check_alive=alive)
            if not status.ok:
                raise RunError(f"run {run_id} ended {status}" + (f": {status.details}" if status.details else "")
                               + f"\n--- last lines of {run_log} ---\n{tail(run_log)}")
            summary_path = out / "summary.json"
            if not summary_path.exists():
                raise RunError(f"run {run_id} completed but wrote no summary.json; see {run_log}")
            summary = json.loads(summary_path.read_text())
            print_summary(console, summary, out, time.time() - t0)
            return summary
        except KeyboardInterrupt:
            if client is not None and run_id is not None:
                try:
                    client.stop(run_id)
                except Exception:  # noqa: BLE001
                    pass
            raise
        finally:
            if client is not None:
                client.close()
            if logs is not None:
                logs.stop()


__all__ = [
    "CONNECTION",
    "DeployError",
    "Pidfile",
    "admin_address",
    "coordinator_paths",
    "coordinator_status",
    "gateway_command",
    "launch_gateway",
    "launch_superlink",
    "load_site_keys",
    "refusal_reason",
    "register_sites",
    "run_federation",
    "site_paths",
    "start_coordinator",
    "start_site",
    "stop_coordinator",
    "stop_site",
    "superlink_command",
    "supernode_command",
    "validate_site",
]
