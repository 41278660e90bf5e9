"""Abuse of the public endpoint (a separate process, as deployed): unauthenticated, slow, malformed and oversized
traffic on loopback, bounded in count and time. The endpoint's file descriptors and memory stay bounded, it
keeps serving the real site, and the SuperLink (an HTTPS stand-in that records requests) receives nothing."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from fedseek.ops import pki
from fedseek.ops.processes import free_port, wait_for_port
from fedseek.ops.transport.access import write_sites
from fedseek.ops.transport.fleet import method_path
from fedseek.wire.identity import read_site_keys
from tests.transport_rig import Recorder, make_site, start_upstream

MB = 1024 * 1024
LIMIT = 4 * MB


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse")
    certs = root / "certs"
    pki.init_ca(certs, hosts=[], ips=[])
    site = make_site(root, certs, "site-a")
    sites_file = root / "sites.json"
    write_sites(sites_file, read_site_keys([("site-a", site.node_pub)]))
    rec = Recorder()
    upstream, up_port = start_upstream(certs, rec)
    port = free_port()
    cmd = [sys.executable, "-m", "fedseek.ops.transport.endpoint", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{up_port}",
           "--certfile", str(certs / pki.COORDINATOR_CRT), "--keyfile", str(certs / pki.COORDINATOR_KEY),
           "--cafile", str(certs / pki.CA_CRT), "--sites", str(sites_file), "--max-message-bytes", str(LIMIT),
           "--max-connections", "32", "--handshake-timeout-s", "2", "--idle-timeout-s", "5"]
    log = open(root / "endpoint.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
        yield {"proc": proc, "port": port, "certs": certs, "site": site, "rec": rec, "log": root / "endpoint.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()
        upstream.stop()


def _good_call(ep, body: bytes = b"x", timeout: float = 20.0):  # type: ignore[no-untyped-def]
    site = ep["site"]
    creds = grpc.ssl_channel_credentials((ep["certs"] / pki.CA_CRT).read_bytes(), site.tls_key.read_bytes(), site.cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{ep['port']}", creds) as ch:
        try:
            return ch.unary_unary(method_path("get-run"))(body, metadata=[("flwr-public-key", site.node_key_header())], timeout=timeout)
        except grpc.RpcError as exc:
            return exc


def _closed(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has closed (EOF or reset); one still held open times out and does not count."""
    closed = 0
    for s in socks:
        s.settimeout(5)
        try:
            closed += s.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
    return closed


def _settle(pid: int, baseline: int, slack: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    n = _fds(pid)
    while n > baseline + slack and time.monotonic() < deadline:
        time.sleep(0.2)
        n = _fds(pid)
    return n


def test_strangers_slow_malformed_and_oversized_traffic_stay_bounded(endpoint):
    ep, pid = endpoint, endpoint["proc"].pid
    assert not isinstance(_good_call(ep), grpc.RpcError)  # warm: the real site works
    served = len(ep["rec"].requests)
    fds0, rss0 = _fds(pid), _rss_mb(pid)

    # 1. 300 TLS handshakes without a client certificate
    ctx = ssl.create_default_context(cafile=str(ep["certs"] / pki.CA_CRT))
    ctx.set_alpn_protocols(["h2"])
    refused = 0
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", ep["port"]), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                refused += tls.recv(1) == b""
        except (ssl.SSLError, OSError):
            refused += 1
    assert refused == 300

    # 2. malformed: plaintext HTTP and random bytes (closed at once), truncated ClientHellos (held to the 2 s deadline)
    for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096)):
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", ep["port"]), timeout=10) as s:
                s.sendall(payload)
                s.settimeout(10)
                try:
                    s.recv(1024)
                except (TimeoutError, ConnectionResetError):
                    pass
    truncated = [socket.create_connection(("127.0.0.1", ep["port"]), timeout=10) for _ in range(30)]
    try:
        for s in truncated:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        time.sleep(3.0)
        assert _closed(truncated) == 30
    finally:
        for s in truncated:
            s.close()

    # 3. 60 slow connections that never finish a handshake (over the 32-connection cap): all closed within the bound
    slow = [socket.create_connection(("127.0.0.1", ep["port"]), timeout=10) for _ in range(60)]
    try:
        assert _fds(pid) <= fds0 + 32 + 8  # the cap holds while they hang
        time.sleep(4.0)  # handshake deadline 2 s
        assert _closed(slow) == 60
    finally:
        for s in slow:
            s.close()

    # 4. oversized authenticated calls
    for _ in range(5):
        err = _good_call(ep, b"\0" * (LIMIT + 1))
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert len(ep["rec"].requests) == served  # none of it reached the SuperLink
    assert not isinstance(_good_call(ep), grpc.RpcError)  # and the real site is still served
    fds1 = _settle(pid, fds0, 4)
    assert fds1 <= fds0 + 4, (fds0, fds1)
    assert _rss_mb(pid) - rss0 < 64, (rss0, _rss_mb(pid))
    print(f"endpoint fds {fds0} -> {fds1}, RSS {rss0:.0f} -> {_rss_mb(pid):.0f} MB after 300 strangers, 90 malformed, "
          f"60 slow, 5 oversized")
