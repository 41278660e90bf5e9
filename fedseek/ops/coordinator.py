"""The coordinator service: a Flower SuperLink on loopback and the sites' one public entry (gRPC mTLS endpoint).

`fedseek coordinator start|stop|status --config server/coordinator.yaml`: a SuperLink with TLS
(`certs_dir`: ca.crt, coordinator.crt/.key), SuperNode authentication and a sqlite database,
detached in its own session with a pidfile in `superlink.state_dir`; every allowed site's
public key is registered through the Control API at start (fedseek.ops.registration). With the default
transport (`grpc`) the coordinator endpoint (fedseek.ops.transport.endpoint) is the only public
listener: mutual TLS, Fleet RPCs only, each call's certificate and node key checked against
`sites`. What Flower 1.41 leaves open (the Control API shares the Fleet port) is in docs/deployment.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedseek.config import CoordinatorConfig
from fedseek.ops.daemons import (
    ENDPOINT_PIDFILE,
    GATEWAY_PIDFILE,
    SUPERLINK_PIDFILE,
    DeployError,
    Pidfile,
    launch_detached,
    running_pidfile,
    stop_pidfile,
)
from fedseek.ops.flower_control import flower_env, flwr_bin, write_connection
from fedseek.ops.follow import tail
from fedseek.ops.processes import port_open, wait_for_port
from fedseek.ops.registration import CONNECTION, list_nodes, load_site_keys, register_sites, site_nodes, spki

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


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
    from fedseek.ops import pki

    state = Path(cfg.superlink.state_dir)
    certs = Path(cfg.superlink.certs_dir)
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


def write_admin_connection(cfg: CoordinatorConfig, paths: CoordinatorPaths) -> None:
    """The operator's Flower connection to this coordinator's Control API (FLWR_HOME under state_dir)."""
    write_connection(paths.flwr_home, CONNECTION, admin_address(cfg), root_certificates=paths.ca)


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
    if spki(key.public_key()) != spki(pki.load_cert(paths.cert).public_key()):
        raise DeployError(f"coordinator TLS: {paths.key} does not belong to {paths.cert}", 2)


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
    write_admin_connection(cfg, paths)
    if port_open(admin_host(cfg), cfg.superlink.port):
        raise DeployError(f"port {cfg.superlink.port} on {admin_host(cfg)} is already in use (another coordinator?)")
    address = f"{cfg.superlink.host}:{cfg.superlink.port}"
    proc, pf = launch_detached(superlink_command(cfg, paths), flower_env(paths.flwr_home), paths.stdout_log, paths.pidfile, address)
    try:
        wait_for_port(admin_host(cfg), cfg.superlink.port, wait_s, proc)
    except (RuntimeError, TimeoutError) as exc:
        stop_pidfile(paths.pidfile)
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


def _launch_listener(cmd: list[str], paths: CoordinatorPaths, name: str, host: str, port: int, wait_s: float) -> Pidfile:
    """Start a public listener (endpoint or gateway) detached with state_dir/NAME.pid and NAME.log; wait for its port."""
    probe = "127.0.0.1" if host in WILDCARD_HOSTS else host
    if port_open(probe, port):
        raise DeployError(f"{name} port {port} on {host} is already in use")
    log, pidfile = paths.state_dir / f"{name}.log", paths.state_dir / f"{name}.pid"
    proc, pf = launch_detached(cmd, flower_env(paths.flwr_home), log, pidfile, f"{host}:{port}")
    try:
        wait_for_port(probe, port, wait_s, proc)
    except (RuntimeError, TimeoutError) as exc:
        stop_pidfile(pidfile)
        raise DeployError(f"the {name} did not start ({exc}); see {log}:\n{tail(log)}") from None
    return pf


def launch_gateway(cfg: CoordinatorConfig, *, wait_s: float = 30.0) -> Pidfile:
    """Start the gateway detached with its pidfile (state_dir/gateway.pid) and wait for its port."""
    paths = coordinator_paths(cfg)
    gw = cfg.gateway
    assert gw is not None
    return _launch_listener(gateway_command(cfg, paths), paths, "gateway", gw.host, gw.port, wait_s)


MIN_MESSAGE_BYTES = 16 * 1024 * 1024


def message_limit(cfg: CoordinatorConfig) -> int:
    """The endpoint's largest message: endpoint.max_message_mb, else 3x the fp32 model plus 4 MiB (at least 16 MiB).

    Flower sends a message's arrays as separate objects, so no single call is larger than the model.
    """
    if cfg.endpoint.max_message_mb:
        return cfg.endpoint.max_message_mb * 1024 * 1024
    from fedseek.train.models import build_model

    shape, classes = _task_shape(cfg)
    model = build_model(cfg.model.kind, shape, classes, cfg.model.hidden, width=cfg.model.width)
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    if cfg.distill is not None:  # the teacher's weights travel beside the model in every TRAIN message
        teacher = Path(cfg.distill.teacher) / "model.pt"
        model_bytes += teacher.stat().st_size if teacher.is_file() else 0
    return max(MIN_MESSAGE_BYTES, 3 * model_bytes + 4 * 1024 * 1024)


def _task_shape(cfg: CoordinatorConfig) -> tuple[tuple[int, ...], int]:
    """The model's input shape and class count from the coordinator's task (given, its test table, or the dataset)."""
    t = cfg.task
    if t.input_shape is not None and t.num_classes is not None:
        return tuple(int(d) for d in t.input_shape), int(t.num_classes)
    from fedseek.data import DataError, load_builtin, load_table

    try:
        if t.test_file:
            test = load_table(t.test_file, str(t.label_column), t.feature_columns, standardize=t.standardize, classes=t.classes)
        else:
            _, test = load_builtin(str(t.dataset), cfg.seed, test_fraction=t.test_fraction, **t.options)
    except (DataError, ValueError, OSError) as exc:
        raise DeployError(f"task: {' '.join(str(exc).split())}", 2) from None
    return tuple(test.input_shape), int(test.num_classes)


def endpoint_command(cfg: CoordinatorConfig, paths: CoordinatorPaths, sites_file: Path, max_message_bytes: int) -> list[str]:
    """The coordinator endpoint's command line (public gRPC listener with mutual TLS -> loopback SuperLink)."""
    ep = cfg.endpoint
    host = f"[{ep.host}]" if ":" in ep.host else ep.host
    return [sys.executable, "-m", "fedseek.ops.transport.endpoint", "--listen", f"{host}:{ep.port}",
            "--upstream", admin_address(cfg), "--certfile", str(paths.cert), "--keyfile", str(paths.key),
            "--cafile", str(paths.ca), "--sites", str(sites_file), "--revoked", str(paths.ca.parent / "revoked.json"),
            "--max-message-bytes", str(max_message_bytes), "--max-concurrent-calls", str(ep.max_concurrent_calls),
            "--max-connections", str(ep.max_connections), "--call-timeout-s", str(ep.call_timeout_s)]


def launch_endpoint(cfg: CoordinatorConfig, keys: dict[str, bytes], *, wait_s: float = 30.0) -> Pidfile:
    """Write the endpoint's sites file, start it detached (state_dir/endpoint.pid) and wait for its port."""
    from fedseek.ops.transport.access import write_sites

    paths = coordinator_paths(cfg)
    sites_file = paths.state_dir / "endpoint-sites.json"
    write_sites(sites_file, keys)
    cmd = endpoint_command(cfg, paths, sites_file, message_limit(cfg))
    return _launch_listener(cmd, paths, "endpoint", cfg.endpoint.host, cfg.endpoint.port, wait_s)


def _ensure_endpoint(cfg: CoordinatorConfig, paths: CoordinatorPaths, keys: dict[str, bytes], console: Console) -> None:
    epf = running_pidfile(paths.state_dir / ENDPOINT_PIDFILE)
    if epf is not None:
        console.print(f"endpoint already running (pid {epf.pid}) on {epf.address}")
        return
    epf = launch_endpoint(cfg, keys)
    console.print(f"endpoint started (pid {epf.pid}) on {epf.address}: sites connect here over gRPC with mutual TLS; "
                  f"only Fleet calls from listed sites pass, the SuperLink stays on {admin_address(cfg)}")


def _ensure_superlink(cfg: CoordinatorConfig, paths: CoordinatorPaths, console: Console, wait_s: float) -> None:
    pf = running_pidfile(paths.pidfile)
    if pf is not None:
        console.print(f"coordinator already running (pid {pf.pid}) on {pf.address}")
        write_admin_connection(cfg, paths)
        return
    pf = launch_superlink(cfg, wait_s=wait_s)
    console.print(f"coordinator started (pid {pf.pid}) on {pf.address} over TLS, site authentication on; "
                  f"database {cfg.superlink.database}")
    if cfg.superlink.host in WILDCARD_HOSTS:
        console.print("[yellow]warning:[/] the SuperLink listens on every interface: its Control API (run, stop, "
                      "register, logs) is reachable by anyone who can reach the Fleet API. Keep it on 127.0.0.1 "
                      "behind the default gRPC endpoint: see docs/deployment.md.")


def _ensure_gateway(cfg: CoordinatorConfig, paths: CoordinatorPaths, console: Console) -> None:
    gpf = running_pidfile(paths.state_dir / GATEWAY_PIDFILE)
    if gpf is not None:
        console.print(f"gateway already running (pid {gpf.pid}) on {gpf.address}")
        return
    gpf = launch_gateway(cfg)
    console.print(f"gateway started (pid {gpf.pid}) on {gpf.address}: sites connect here; only the Fleet API "
                  f"is forwarded, the Control API stays on {admin_address(cfg)}")


def start_coordinator(cfg: CoordinatorConfig, console: Console, *, wait_s: float = 60.0) -> list[str]:
    """Check the TLS material and site keys, start the SuperLink (or find it running), register the allowed sites.

    Returns registration problems (one line each); raises DeployError (exit 2) for bad certificates or keys.
    """
    paths = coordinator_paths(cfg)
    check_coordinator_certs(cfg, paths)
    keys = load_site_keys(cfg)
    _ensure_superlink(cfg, paths, console, wait_s)
    if cfg.transport == "grpc":
        _ensure_endpoint(cfg, paths, keys, console)
    if cfg.gateway is not None:
        _ensure_gateway(cfg, paths, console)
    return register_sites(cfg, paths.flwr_home, keys, console)


def stop_coordinator(cfg: CoordinatorConfig) -> Pidfile | None:
    """Stop the endpoint and gateway (if any), then the SuperLink and everything it spawned; None if it was not running."""
    paths = coordinator_paths(cfg)
    stop_pidfile(paths.state_dir / ENDPOINT_PIDFILE)
    stop_pidfile(paths.state_dir / GATEWAY_PIDFILE)
    return stop_pidfile(paths.pidfile)


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
    if cfg.transport == "grpc":
        epf = Pidfile.read(paths.state_dir / ENDPOINT_PIDFILE)
        out["endpoint"] = {"running": bool(epf and epf.running()), "pid": epf.pid if epf else None,
                           "address": f"{cfg.endpoint.host}:{cfg.endpoint.port}"}
    if not out["running"]:
        return out
    try:
        keys = load_site_keys(cfg)
    except DeployError as exc:
        out["error"] = str(exc)
        keys = {}
    out["sites"], out["other_nodes"] = site_nodes(cfg, keys, list_nodes(paths.flwr_home, attempts=3))
    return out
