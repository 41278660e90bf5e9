"""The allowed sites' keys at the coordinator: loading them, registering them with the SuperLink, matching nodes to sites.

Flower's SuperNode authentication admits a node whose public key is registered through the
Control API (`flwr supernode register`). A site is matched to its node by key (DER
SubjectPublicKeyInfo), never by the self-declared node name.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedseek.config import CoordinatorConfig
from fedseek.ops.daemons import DeployError
from fedseek.ops.flower_control import ControlClient, flower_env, flwr_bin
from fedseek.wire.identity import KeyFileError, read_site_keys
from fedseek.wire.identity import pem_spki as node_spki
from fedseek.wire.identity import spki as spki  # re-exported: ops.coordinator compares certificate keys with it

CONNECTION = "fedseek"


def load_site_keys(cfg: CoordinatorConfig) -> dict[str, bytes]:
    """Every allowed site's public key (DER SubjectPublicKeyInfo) from its OpenSSH .pub file; DeployError exit 2."""
    try:
        return read_site_keys((site.name, site.public_key) for site in cfg.sites)
    except KeyFileError as exc:
        raise DeployError(str(exc), 2) from None


def control(flwr_home: Path, attempts: int = 10) -> ControlClient:
    """A Control API client (quiet); retried briefly while a just-started SuperLink comes up."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            client = ControlClient(flwr_home, CONNECTION, quiet=True)
            client.nodes()
            return client
        except Exception as exc:  # noqa: BLE001 - Flower raises several kinds while starting
            last = exc
            time.sleep(1.0)
    raise DeployError(f"the coordinator's Control API does not answer: {last}")


def list_nodes(flwr_home: Path, attempts: int = 10) -> list[dict]:
    """The SuperLink's registered nodes (see ControlClient.nodes)."""
    client = control(flwr_home, attempts)
    try:
        return client.nodes()
    finally:
        client.close()


def _register(cfg_site: Any, env: dict[str, str]) -> tuple[dict | None, str]:
    """`flwr supernode register KEY --name NAME`: (its JSON answer, its raw output)."""
    res = subprocess.run([flwr_bin("flwr"), "supernode", "register", cfg_site.public_key, CONNECTION, "--name", cfg_site.name,
                          "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
    return last_json(res.stdout), (res.stderr or res.stdout)


def register_sites(cfg: CoordinatorConfig, flwr_home: Path, keys: dict[str, bytes], console: Console) -> list[str]:
    """Register each allowed site's key (`flwr supernode register`); already registered is fine. Returns problems."""
    env = flower_env(flwr_home)
    nodes = list_nodes(flwr_home)
    by_key = {node_spki(n["public_key"]): n for n in nodes if n["public_key"]}
    problems: list[str] = []
    for site in cfg.sites:
        known = by_key.get(keys[site.name])
        if known is not None:
            if known["status"] == "unregistered":
                problems.append(f"site {site.name}: its key was unregistered and Flower refuses to register a key twice: "
                                f"issue a new one (`fedseek certs request {site.name} --force` at the site, "
                                f"`fedseek certs sign ... --force` here) and update sites[].public_key")
            else:
                console.print(f"site {site.name}: registered (node {known['node_id']}, {known['status']})")
            continue
        payload, raw = _register(site, env)
        if payload and payload.get("success"):
            console.print(f"site {site.name}: key registered (node {payload.get('node-id')})")
        else:
            detail = (payload or {}).get("error-message") or raw.strip()
            problems.append(f"site {site.name}: registration failed: {one_line(detail)}")
    allowed = set(keys.values())
    for n in nodes:
        if n["status"] != "unregistered" and node_spki(n["public_key"]) not in allowed:
            problems.append(f"node {n['node_id']} ({n['name'] or 'no name'}) is registered but not in sites: "
                            f"revoke it with `FLWR_HOME={flwr_home} flwr supernode unregister {n['node_id']} {CONNECTION}`")
    return problems


def site_nodes(cfg: CoordinatorConfig, keys: dict[str, bytes], nodes: list[dict]) -> tuple[list[dict], list[dict]]:
    """(each allowed site with its node id and status, the registered nodes that are no allowed site)."""
    by_key = {node_spki(n["public_key"]): n for n in nodes}
    sites = []
    for site in cfg.sites:
        n = by_key.get(keys.get(site.name, b"-"))
        sites.append({"name": site.name, "node_id": n["node_id"] if n else None, "status": n["status"] if n else "not registered"})
    allowed = set(keys.values())
    others = [{"node_id": n["node_id"], "name": n["name"], "status": n["status"]}
              for n in nodes if node_spki(n["public_key"]) not in allowed]
    return sites, others


def last_json(text: str) -> dict | None:
    """The last JSON object in a command's output (Flower prints other lines before it)."""
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def one_line(text: str) -> str:
    """A command's error output on one line (at most 400 characters, Flower's connection banner dropped)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Using SuperLink")]
    return " ".join(lines)[-400:] or "(no output)"
