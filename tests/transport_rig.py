"""A loopback rig for the gRPC transport: federation PKI, an HTTPS stand-in for the SuperLink that records
what reaches it, the coordinator endpoint and the site proxies, each serving from its own threads.

The stand-in plays the SuperLink's part only (answering Fleet paths with the status and headers a
test asks for); the endpoint, the site proxy, TLS and gRPC are the real ones.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseek.ops import pki
from fedseek.ops.pki.requests import request_site, sign_request
from fedseek.ops.processes import free_port
from fedseek.ops.transport.access import RevocationList, SiteAccess
from fedseek.ops.transport.endpoint import Endpoint, EndpointLimits
from fedseek.ops.transport.loopback_tls import ensure_loopback_tls
from fedseek.ops.transport.site_proxy import SiteProxy, uvicorn_config
from fedseek.wire.identity import read_site_keys


@dataclass
class Recorder:
    """What reached the SuperLink stand-in."""

    requests: list[tuple[str, dict[str, str], int]] = field(default_factory=list)
    delay_s: float = 0.0


def superlink_standin(rec: Recorder):  # type: ignore[no-untyped-def]
    """ASGI app: records each request; answers with status `flwr-test-status` (default 200), body = sha256 + length."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        rec.requests.append((scope["path"], headers, len(body)))
        if rec.delay_s:
            await asyncio.sleep(rec.delay_s)
        status = int(headers.get("flwr-test-status", "200"))
        out = hashlib.sha256(body).digest() + len(body).to_bytes(8, "big")
        if headers.get("flwr-test-echo") == "body":
            out = body
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/protobuf"), (b"flwr-echo", headers.get("flwr-test-echo", "").encode()),
            (b"x-internal", b"not-forwarded"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    return app


class ThreadServer:
    """A uvicorn server in a thread (stopped by `stop`)."""

    def __init__(self, config: uvicorn.Config):
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 20.0) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class SiteFiles:
    name: str
    dir: Path
    node_key: Path
    node_pub: Path
    tls_key: Path
    cert: Path

    def node_key_header(self) -> str:
        """The `flwr-public-key` value Flower's SuperNode sends (base64 of the PEM public key)."""
        key = serialization.load_ssh_private_key(self.node_key.read_bytes(), password=None)
        pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(pem).decode()


def make_site(root: Path, certs: Path, name: str, *, sign: bool = True) -> SiteFiles:
    """`certs request` at the site, `certs sign` at the coordinator (the certificate copied back to the site)."""
    req = request_site(root / "sites" / name, name)
    cert = root / "sites" / name / f"{name}.crt"
    if sign:
        signed = sign_request(certs, req.csr, req.node_pub)
        cert.write_bytes(signed.cert.read_bytes())
    return SiteFiles(name, root / "sites" / name, req.node_key, req.node_pub, req.tls_key, cert)


def client_cert(ca_key, ca_cert, name: str, *, days: int = 30, expired: bool = False,  # type: ignore[no-untyped-def]
                eku=ExtendedKeyUsageOID.CLIENT_AUTH) -> tuple[bytes, bytes]:
    """(key PEM, cert PEM) for `name` signed by any CA, optionally already expired."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (now - dt.timedelta(minutes=5),
                                                                                            now + dt.timedelta(days=days))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


@dataclass
class Rig:
    root: Path
    certs: Path
    sites: dict[str, SiteFiles]
    rec: Recorder
    upstream: ThreadServer
    upstream_port: int
    endpoint: Endpoint
    endpoint_port: int
    proxies: dict[str, tuple[ThreadServer, int, Path]]  # server, port, the loopback CA the SuperNode trusts

    def proxy_url(self, site: str, rpc: str) -> str:
        return f"https://127.0.0.1:{self.proxies[site][1]}/v1/fleet/{rpc}"


def start_upstream(certs: Path, rec: Recorder, port: int | None = None) -> tuple[ThreadServer, int]:
    port = port or free_port()
    cfg = uvicorn.Config(superlink_standin(rec), host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                         ssl_certfile=str(certs / pki.COORDINATOR_CRT), ssl_keyfile=str(certs / pki.COORDINATOR_KEY))
    return ThreadServer(cfg).start(), port


def start_proxy(root: Path, certs: Path, site: SiteFiles, endpoint_port: int, *, max_message_bytes: int,
                call_timeout_s: float) -> tuple[ThreadServer, int, Path]:
    tls = ensure_loopback_tls(root / "loopback" / site.name)
    app = SiteProxy(f"127.0.0.1:{endpoint_port}", cafile=str(certs / pki.CA_CRT), certfile=str(site.cert),
                    keyfile=str(site.tls_key), max_message_bytes=max_message_bytes, call_timeout_s=call_timeout_s)
    port = free_port()
    return ThreadServer(uvicorn_config(app, port, str(tls.cert), str(tls.key))).start(), port, tls.ca


def build_rig(root: Path, *, max_message_bytes: int = 80 * 1024 * 1024, call_timeout_s: float = 10.0,
              registered: tuple[str, ...] = ("site-a", "site-b"), extra: tuple[str, ...] = ("rogue",)) -> Rig:
    certs = root / "certs"
    pki.init_ca(certs, hosts=[], ips=[])
    sites = {n: make_site(root, certs, n) for n in (*registered, *extra)}
    keys = read_site_keys((n, sites[n].node_pub) for n in registered)
    rec = Recorder()
    upstream, up_port = start_upstream(certs, rec)
    limits = EndpointLimits(max_message_bytes=max_message_bytes, call_timeout_s=call_timeout_s, max_connections=32)
    ep = Endpoint("127.0.0.1:0", f"127.0.0.1:{up_port}", certfile=str(certs / pki.COORDINATOR_CRT),
                  keyfile=str(certs / pki.COORDINATOR_KEY), cafile=str(certs / pki.CA_CRT),
                  access=SiteAccess(keys, RevocationList(certs / "revoked.json")), limits=limits)
    ep_port = ep.start()
    proxies = {n: start_proxy(root, certs, sites[n], ep_port, max_message_bytes=max_message_bytes,
                              call_timeout_s=call_timeout_s) for n in sites}
    return Rig(root, certs, sites, rec, upstream, up_port, ep, ep_port, proxies)


def stop_rig(rig: Rig) -> None:
    for srv, _, _ in rig.proxies.values():
        srv.stop()
    rig.endpoint.stop(0.5)
    rig.upstream.stop()


def iter_sites(rig: Rig) -> Iterator[SiteFiles]:
    yield from rig.sites.values()
