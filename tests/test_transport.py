"""The gRPC transport with mutual TLS (site proxy -> coordinator endpoint -> SuperLink), on loopback.

The rig (tests/transport_rig.py) runs the real endpoint and site proxies with real certificates;
an HTTPS stand-in takes the SuperLink's place and records every request that reaches it, so each
refusal can be shown to leave the SuperLink untouched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import time

import grpc
import httpx
import pytest

from fedseek.ops import pki
from fedseek.ops.pki.requests import revoke_site
from fedseek.ops.transport.fleet import SERVICE, method_path
from tests.transport_rig import build_rig, client_cert, start_upstream, stop_rig

MB = 1024 * 1024


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = build_rig(tmp_path_factory.mktemp("transport"), max_message_bytes=80 * MB, call_timeout_s=60.0)
    try:
        yield r
    finally:
        stop_rig(r)


def _post(rig, site: str, rpc: str, body: bytes = b"x", *, key_of: str | None = None, timeout: float = 30.0,
          **headers: str) -> httpx.Response:
    """POST through `site`'s proxy as its SuperNode would (node key header of `key_of`, default the site's own)."""
    _, port, ca = rig.proxies[site]
    h = {"content-type": "application/protobuf", "accept": "application/protobuf",
         "flwr-public-key": rig.sites[key_of or site].node_key_header(), **{k.replace("_", "-"): v for k, v in headers.items()}}
    with httpx.Client(verify=str(ca), timeout=timeout) as c:
        return c.post(f"https://127.0.0.1:{port}/v1/fleet/{rpc}", content=body, headers=h)


def _grpc_call(rig, *, key: bytes | None, cert: bytes | None, method: str = method_path("get-run"), ca: bytes | None = None,
               metadata=(), body: bytes = b"x", timeout: float = 10.0):
    """A direct gRPC call to the endpoint with any (or no) client certificate; returns the grpc.RpcError or the reply."""
    ca = ca or (rig.certs / pki.CA_CRT).read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(f"127.0.0.1:{rig.endpoint_port}", creds) as ch:
        try:
            return ch.unary_unary(method)(body, metadata=list(metadata), timeout=timeout)
        except grpc.RpcError as exc:
            return exc


def test_status_body_content_type_and_flwr_headers_pass_unchanged(rig):
    for status in (200, 401, 403, 404, 409, 500):
        before = len(rig.rec.requests)
        r = _post(rig, "site-a", "pull-messages", b"payload", flwr_test_status=str(status), flwr_test_echo="round-7")
        assert r.status_code == status
        assert r.headers["content-type"] == "application/protobuf" and r.headers["flwr-echo"] == "round-7"
        assert "x-internal" not in r.headers  # only content-type and flwr-* cross back
        assert r.content == hashlib.sha256(b"payload").digest() + (7).to_bytes(8, "big")
        path, headers, size = rig.rec.requests[before]
        assert path == "/v1/fleet/pull-messages" and size == 7
        assert headers["content-type"] == "application/protobuf" and headers["accept"] == "application/protobuf"
        assert headers["flwr-public-key"] == rig.sites["site-a"].node_key_header() and headers["flwr-test-echo"] == "round-7"


@pytest.mark.parametrize("size", [4 * MB, 64 * MB])
def test_large_messages_cross_both_ways(rig, size):
    body = os.urandom(1024) * (size // 1024)
    r = _post(rig, "site-b", "push-object", body, flwr_test_echo="body", timeout=120)
    assert r.status_code == 200 and len(r.content) == size and r.content == body


def test_a_message_over_the_limit_is_refused_at_the_site_and_never_reaches_the_superlink(rig):
    before = len(rig.rec.requests)
    r = _post(rig, "site-a", "push-object", b"\0" * (80 * MB + 1), timeout=120)
    assert r.status_code == 413 and len(rig.rec.requests) == before
    key, cert = (rig.sites["site-a"].tls_key.read_bytes(), rig.sites["site-a"].cert.read_bytes())
    err = _grpc_call(rig, key=key, cert=cert, body=b"\0" * (80 * MB + 1), timeout=60,
                     metadata=[("flwr-public-key", rig.sites["site-a"].node_key_header())])
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(rig.rec.requests) == before


def test_only_fleet_paths_exist_on_the_proxy(rig):
    _, port, ca = rig.proxies["site-a"]
    with httpx.Client(verify=str(ca), timeout=10) as c:
        for method, path in (("POST", "/v1/control/list-runs"), ("GET", "/v1/fleet/get-run"), ("POST", "/v1/fleet/../control/start-run"),
                             ("POST", "/docs"), ("POST", "/v1/runtime/pull-app-inputs")):
            assert c.request(method, f"https://127.0.0.1:{port}{path}").status_code == 404, path


def test_control_methods_are_unimplemented_on_the_endpoint(rig):
    site = rig.sites["site-a"]
    before = len(rig.rec.requests)
    for method in ("/flwr.proto.Control/StartRun", "/flwr.proto.Control/ListRuns", f"/{SERVICE}/start-run",
                   f"/{SERVICE}/list-runs", "/flwr.proto.ServerAppIo/PullMessages"):
        err = _grpc_call(rig, key=site.tls_key.read_bytes(), cert=site.cert.read_bytes(), method=method,
                         metadata=[("flwr-public-key", site.node_key_header())])
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNIMPLEMENTED, method
    assert len(rig.rec.requests) == before


def test_strangers_are_refused_and_the_superlink_receives_nothing(rig, tmp_path):
    before = len(rig.rec.requests)
    ca_key, ca_cert = pki.load_private_key(rig.certs / pki.CA_KEY), pki.load_cert(rig.certs / pki.CA_CRT)
    other_key, other_ca = pki.issue_ca("another CA")
    header = [("flwr-public-key", rig.sites["site-a"].node_key_header())]
    cases = {
        "no certificate": (None, None),
        "another CA": client_cert(other_key, other_ca, "site-a"),
        "expired": client_cert(ca_key, ca_cert, "site-a", expired=True),
    }
    for what, (key, cert) in cases.items():  # refused in the TLS handshake
        err = _grpc_call(rig, key=key, cert=cert, metadata=header)
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, what
    listed_elsewhere = client_cert(ca_key, ca_cert, "hospital-z")
    err = _grpc_call(rig, key=listed_elsewhere[0], cert=listed_elsewhere[1], metadata=header)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "not in the coordinator's sites" in err.details()
    server_only = client_cert(ca_key, ca_cert, "site-a", eku=pki_server_auth())
    err = _grpc_call(rig, key=server_only[0], cert=server_only[1], metadata=header)
    assert isinstance(err, grpc.RpcError) and err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE)
    # a registered site's certificate with another registered site's node key, or none
    r = _post(rig, "site-a", "pull-messages", key_of="site-b")
    assert r.status_code == 401 and "not 'site-a''s registered key" in r.text
    site = rig.sites["site-a"]
    err = _grpc_call(rig, key=site.tls_key.read_bytes(), cert=site.cert.read_bytes())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "no Flower node key" in err.details()
    # a certificate from the federation CA for a site that is not listed
    r = _post(rig, "rogue", "pull-messages")
    assert r.status_code == 401 and "not in the coordinator's sites" in r.text
    assert len(rig.rec.requests) == before
    assert rig.endpoint.stats.denied  # counted by reason


def pki_server_auth():  # type: ignore[no-untyped-def]
    from cryptography.x509.oid import ExtendedKeyUsageOID

    return ExtendedKeyUsageOID.SERVER_AUTH


def test_public_port_negotiates_h2_and_requests_a_client_certificate(rig):
    site = rig.sites["site-a"]
    ctx = ssl.create_default_context(cafile=str(rig.certs / pki.CA_CRT))
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(str(site.cert), str(site.tls_key))
    with socket.create_connection(("127.0.0.1", rig.endpoint_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.selected_alpn_protocol() == "h2"
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary for the CertificateRequest check")
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{rig.endpoint_port}", "-alpn", "h2", "-tls1_2",
                          "-CAfile", str(rig.certs / pki.CA_CRT)], input="", capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    assert "Client Certificate Types" in text and "Requested Signature Algorithms" in text, text[-2000:]  # a CertificateRequest
    assert "ALPN protocol: h2" in text, text[-2000:]


def test_outage_is_503_and_a_slow_superlink_is_504(rig):
    rig.rec.delay_s, rig.endpoint.limits.call_timeout_s = 8.0, 2.0  # the SuperLink answers after the call's deadline
    try:
        t0 = time.monotonic()
        r = _post(rig, "site-b", "pull-messages")
        assert r.status_code == 504 and time.monotonic() - t0 < 8.0
    finally:
        rig.rec.delay_s, rig.endpoint.limits.call_timeout_s = 0.0, 60.0
    rig.upstream.stop()
    try:
        assert _post(rig, "site-b", "pull-messages").status_code == 503
    finally:
        rig.upstream, _ = start_upstream(rig.certs, rig.rec, rig.upstream_port)
    assert _post(rig, "site-b", "pull-messages").status_code == 200  # and back once the SuperLink is


def test_revoking_a_site_takes_effect_without_a_restart(rig):
    assert _post(rig, "site-b", "pull-messages").status_code == 200
    time.sleep(0.02)  # a distinct mtime for the revocation list
    serials = revoke_site(rig.certs, "site-b")
    assert serials
    before = len(rig.rec.requests)
    r = _post(rig, "site-b", "pull-messages")
    assert r.status_code == 401 and "revoked" in r.text and len(rig.rec.requests) == before
    assert _post(rig, "site-a", "pull-messages").status_code == 200  # the others are untouched
