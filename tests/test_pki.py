"""Tests for fedseek.ops.pki: files and modes, SANs, chain checks, site keys Flower accepts, real TLS."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedseek.ops import pki

UTC = dt.UTC


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(path: Path) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), [str(a) for a in ext.get_values_for_type(x509.IPAddress)]


@pytest.fixture()
def certs(tmp_path: Path) -> pki.CertPaths:
    return pki.init_ca(tmp_path / "certs", hosts=["coord.example.org"], ips=["10.1.2.3"])


# --------------------------------------------------------------------------- init_ca


def test_init_ca_writes_pem_files_with_private_keys_0600(certs: pki.CertPaths) -> None:
    for key in (certs.ca_key, certs.coordinator_key):
        assert _mode(key) == 0o600, key
        load_pem_private_key(key.read_bytes(), password=None)
    for crt in (certs.ca_crt, certs.coordinator_crt):
        assert crt.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        assert _mode(crt) & 0o077 != 0o077  # readable, not a secret
    assert sorted(p.name for p in certs.out_dir.iterdir()) == sorted(
        ["ca.crt", "ca.key", "coordinator.crt", "coordinator.key"]
    )


def test_keys_are_0600_even_with_permissive_umask_and_force(tmp_path: Path) -> None:
    import os

    old = os.umask(0o000)
    try:
        paths = pki.init_ca(tmp_path, ["a.example"], [])
        paths.ca_key.chmod(0o644)  # an old, too-open key must not keep its mode on --force
        paths = pki.init_ca(tmp_path, ["a.example"], [], force=True)
    finally:
        os.umask(old)
    assert _mode(paths.ca_key) == 0o600
    assert _mode(paths.coordinator_key) == 0o600


def test_coordinator_cert_has_loopback_and_requested_names(certs: pki.CertPaths) -> None:
    dns, ips = _sans(certs.coordinator_crt)
    assert "127.0.0.1" in ips and "10.1.2.3" in ips
    assert "localhost" in dns and "coord.example.org" in dns
    cert = x509.load_pem_x509_certificate(certs.coordinator_crt.read_bytes())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert 364 <= pki.cert_expiry_days(cert) <= 365


def test_ca_is_a_ca_with_cert_sign(certs: pki.CertPaths) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca_crt.read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert bc.critical and bc.value.ca is True
    assert ku.value.key_cert_sign is True


def test_ip_literal_given_as_host_becomes_ip_san(tmp_path: Path) -> None:
    paths = pki.init_ca(tmp_path, hosts=["192.0.2.7"], ips=[])
    dns, ips = _sans(paths.coordinator_crt)
    assert "192.0.2.7" in ips and "192.0.2.7" not in dns


@pytest.mark.parametrize(
    ("hosts", "ips", "needle"),
    [(["https://coord"], [], "DNS name"), (["coord"], ["not-an-ip"], "IP address")],
)
def test_bad_hosts_and_ips_rejected(tmp_path: Path, hosts: list[str], ips: list[str], needle: str) -> None:
    with pytest.raises(pki.PkiError, match=needle):
        pki.init_ca(tmp_path, hosts, ips)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_refuses_overwrite_without_force_then_replaces_with_force(certs: pki.CertPaths) -> None:
    before = certs.ca_crt.read_bytes()
    with pytest.raises(pki.PkiError) as err:
        pki.init_ca(certs.out_dir, ["coord.example.org"], [])
    msg = str(err.value)
    assert "\n" not in msg and "--force" in msg and "ca.crt" in msg
    assert certs.ca_crt.read_bytes() == before
    pki.init_ca(certs.out_dir, ["coord.example.org"], [], force=True)
    assert certs.ca_crt.read_bytes() != before


def test_unknown_key_type_rejected(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="key type"):
        pki.init_ca(tmp_path, ["a"], [], key_type="dsa")


def test_writes_replace_a_symlink_instead_of_following_it(certs: pki.CertPaths, tmp_path: Path) -> None:
    """Files are written through the atomic writer: a symlink at the target is replaced, its target untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    certs.ca_crt.unlink()
    certs.ca_crt.symlink_to(victim)
    pki.init_ca(certs.out_dir, ["coord.example.org"], [], force=True)
    assert victim.read_bytes() == b"keep me"
    assert not certs.ca_crt.is_symlink() and certs.ca_crt.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert sorted(p.name for p in certs.out_dir.iterdir()) == ["ca.crt", "ca.key", "coordinator.crt", "coordinator.key"]


def test_public_files_follow_a_strict_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o077)
    try:
        paths = pki.init_ca(tmp_path / "certs", ["a.example"], [])
        bundle = pki.add_site(paths.out_dir, "site1", "a.example:9092")
    finally:
        os.umask(old)
    for public in (paths.ca_crt, paths.coordinator_crt, bundle.public_key, bundle.ca_crt, bundle.site_yaml, bundle.bundle_json):
        assert _mode(public) == 0o600, public
    assert _mode(bundle.private_key) == 0o600


# --------------------------------------------------------------------------- chain


def test_chain_verifies_against_its_ca(certs: pki.CertPaths) -> None:
    pki.verify_chain(certs.ca_crt, certs.coordinator_crt)
    pki.verify_chain(certs.ca_crt, certs.coordinator_crt, hostname="127.0.0.1")
    pki.verify_chain(certs.ca_crt, certs.coordinator_crt, hostname="coord.example.org")
    with pytest.raises(pki.PkiError, match="not valid for"):
        pki.verify_chain(certs.ca_crt, certs.coordinator_crt, hostname="evil.example.org")


def test_cert_from_another_ca_fails_verify_chain(certs: pki.CertPaths) -> None:
    other_key, other_ca = pki.issue_ca("fedseek CA")  # same name, different key
    _, foreign = pki.issue_server_cert(other_key, other_ca, ["coord.example.org"], [])
    with pytest.raises(pki.PkiError, match="not signed by"):
        pki.verify_chain(certs.ca_crt, foreign)
    with pytest.raises(pki.PkiError, match="not signed by"):
        pki.verify_chain(other_ca, certs.coordinator_crt)


def test_expired_cert_fails_verify_chain(certs: pki.CertPaths) -> None:
    ca_key = pki.load_private_key(certs.ca_key)
    ca = pki.load_cert(certs.ca_crt)
    now = dt.datetime.now(UTC)
    _, expired = pki.issue_server_cert(
        ca_key, ca, ["coord.example.org"], [],
        not_valid_before=now - dt.timedelta(days=30), not_valid_after=now - dt.timedelta(days=1),
    )
    with pytest.raises(pki.PkiError, match="expired"):
        pki.verify_chain(ca, expired)
    assert pki.cert_expiry_days(expired) < 0


def test_issue_coordinator_cert_keeps_ca_and_site_bundles(certs: pki.CertPaths) -> None:
    ca_before = certs.ca_crt.read_bytes()
    with pytest.raises(pki.PkiError, match="--force"):
        pki.issue_coordinator_cert(certs.out_dir, ["new.example.org"], [])
    pki.issue_coordinator_cert(certs.out_dir, ["new.example.org"], [], force=True)
    assert certs.ca_crt.read_bytes() == ca_before
    pki.verify_chain(certs.ca_crt, certs.coordinator_crt, hostname="new.example.org")


# --------------------------------------------------------------------------- sites


def test_site_key_is_openssh_p384_0600_and_bundle_complete(certs: pki.CertPaths) -> None:
    b = pki.add_site(certs.out_dir, "hospital-1", "coord.example.org:9092")
    assert b.dir == certs.out_dir / "sites" / "hospital-1"
    assert _mode(b.private_key) == 0o600
    assert b.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = load_ssh_private_key(b.private_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    pub = load_ssh_public_key(b.public_key.read_bytes())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert b.ca_crt.read_bytes() == certs.ca_crt.read_bytes()
    facts = json.loads(b.bundle_json.read_text())
    assert facts["coordinator_address"] == "coord.example.org:9092"
    assert facts["public_key_fingerprint"] == b.fingerprint and b.fingerprint.startswith("SHA256:")
    for rel in ("root_certificates", "auth_private_key", "auth_public_key"):
        assert (b.dir / facts[rel]).is_file()  # paths are relative to the bundle
    text = b.site_yaml.read_text()
    assert "coord.example.org:9092" in text and b.fingerprint in text


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_site_fingerprint_matches_ssh_keygen(certs: pki.CertPaths) -> None:
    b = pki.add_site(certs.out_dir, "bank_a", "127.0.0.1:9092")
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(b.public_key)], capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[1] == b.fingerprint


def test_flower_accepts_site_keys(certs: pki.CertPaths) -> None:
    register = pytest.importorskip("flwr.cli.supernode.register")
    supernode = pytest.importorskip("flwr.supernode.cli.flower_supernode")
    b = pki.add_site(certs.out_dir, "hospital-2", "localhost:9092")
    # `flwr supernode register NAME.pub` and `flower-supernode --auth-supernode-private-key NAME`
    assert register.try_load_public_key(b.public_key)
    pair = supernode._try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(b.private_key), auth_supernode_public_key=None)
    )
    assert pair is not None and isinstance(pair[0].curve, ec.SECP384R1)


@pytest.mark.parametrize("name", ["", "../evil", "a b", "ca.crt", "-rf", "x" * 64, "h\u00f4pital", "a/b"])
def test_bad_site_names_rejected(certs: pki.CertPaths, name: str) -> None:
    with pytest.raises(pki.PkiError, match="invalid site name"):
        pki.add_site(certs.out_dir, name, "coord.example.org:9092")
    assert not (certs.out_dir / "sites").exists()


@pytest.mark.parametrize("address", ["https://coord.example.org:9092", "coord.example.org", "coord:0"])
def test_bad_coordinator_address_rejected(certs: pki.CertPaths, address: str) -> None:
    with pytest.raises(pki.PkiError, match="coordinator address"):
        pki.add_site(certs.out_dir, "site1", address)


def test_address_not_covered_by_coordinator_cert_rejected(certs: pki.CertPaths) -> None:
    with pytest.raises(pki.PkiError, match="not valid for 'other.example.org'"):
        pki.add_site(certs.out_dir, "site1", "other.example.org:9092")


def test_add_site_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="certs init"):
        pki.add_site(tmp_path, "site1", "localhost:9092")


def test_add_site_refuses_overwrite_without_force(certs: pki.CertPaths) -> None:
    b = pki.add_site(certs.out_dir, "site1", "localhost:9092")
    key_before = b.private_key.read_bytes()
    with pytest.raises(pki.PkiError, match="--force") as err:
        pki.add_site(certs.out_dir, "site1", "localhost:9092")
    assert "\n" not in str(err.value)
    assert b.private_key.read_bytes() == key_before
    b2 = pki.add_site(certs.out_dir, "site1", "localhost:9092", force=True)
    assert b2.private_key.read_bytes() != key_before and b2.fingerprint != b.fingerprint


# --------------------------------------------------------------------------- show


def test_show_lists_days_left_sans_and_site_fingerprints(certs: pki.CertPaths) -> None:
    b = pki.add_site(certs.out_dir, "hospital-1", "coord.example.org:9092")
    infos = pki.show(certs.out_dir)
    by_path = {i.path: i for i in infos}
    coord = by_path[certs.coordinator_crt]
    assert coord.kind == "server" and not coord.expired and coord.days_left is not None and 364 <= coord.days_left <= 365
    assert "IP:127.0.0.1" in coord.sans and coord.key_type == "EC P-256"
    assert coord.problems == ()
    assert by_path[certs.ca_crt].kind == "ca"
    site = by_path[b.public_key]
    assert site.kind == "site-key" and site.fingerprint == b.fingerprint and site.key_type == "EC P-384"
    assert all(not i.problems for i in infos), [i.problems for i in infos]
    text = pki.format_show(infos)
    assert "days left" in text and b.fingerprint in text and "hospital-1" in text


def test_show_flags_expired_cert_open_key_and_stale_site_ca(certs: pki.CertPaths) -> None:
    b = pki.add_site(certs.out_dir, "site1", "localhost:9092")
    ca_key, ca = pki.load_private_key(certs.ca_key), pki.load_cert(certs.ca_crt)
    now = dt.datetime.now(UTC)
    _, old = pki.issue_server_cert(
        ca_key, ca, ["coord.example.org"], [],
        not_valid_before=now - dt.timedelta(days=400), not_valid_after=now - dt.timedelta(days=3),
    )
    pki.write_cert(certs.coordinator_crt, old)  # replaces the file
    certs.ca_key.chmod(0o644)
    _, other_ca = pki.issue_ca()
    pki.write_cert(b.ca_crt, other_ca)  # site bundle now holds another CA
    infos = {i.path: i for i in pki.show(certs.out_dir)}
    coord = infos[certs.coordinator_crt]
    assert coord.expired and coord.days_left is not None and coord.days_left <= -3
    assert any("expired" in p for p in coord.problems)
    assert any("does not match" in p for p in infos[certs.coordinator_key].problems)
    assert any("chmod 600" in p for p in infos[certs.ca_key].problems)
    assert any("differs" in p for p in infos[b.ca_crt].problems)
    assert "EXPIRED" in pki.format_show(list(infos.values()))


def test_show_flags_server_cert_without_loopback_san(certs: pki.CertPaths) -> None:
    ca_key, ca = pki.load_private_key(certs.ca_key), pki.load_cert(certs.ca_crt)
    key, cert = pki.issue_server_cert(ca_key, ca, ["coord.example.org"], [], include_loopback=False)
    pki.write_cert(certs.coordinator_crt, cert)
    pki.write_private_key(certs.coordinator_key, key)
    coord = next(i for i in pki.show(certs.out_dir) if i.path == certs.coordinator_crt)
    assert any("127.0.0.1" in p for p in coord.problems)


# --------------------------------------------------------------------------- real TLS


@contextmanager
def tls_server(certfile: Path, keyfile: Path) -> Iterator[int]:
    """A one-line TLS echo server on 127.0.0.1 (ephemeral port) in a thread; yields the port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok\n")
            except (ssl.SSLError, OSError):
                pass  # client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()


def _client(cafile: Path | bytes, port: int, server_hostname: str = "127.0.0.1") -> bytes:
    if isinstance(cafile, Path):
        ctx = ssl.create_default_context(cafile=str(cafile))
    else:
        ctx = ssl.create_default_context(cadata=cafile.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(16)


def test_tls_client_trusting_ca_connects(certs: pki.CertPaths) -> None:
    with tls_server(certs.coordinator_crt, certs.coordinator_key) as port:
        assert _client(certs.ca_crt, port) == b"ok\n"
        assert _client(certs.ca_crt, port, "localhost") == b"ok\n"
        assert _client(certs.ca_crt, port, "coord.example.org") == b"ok\n"


def test_tls_client_trusting_another_ca_fails(certs: pki.CertPaths) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    _, other_ca = pki.issue_ca("fedseek CA")
    with tls_server(certs.coordinator_crt, certs.coordinator_key) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            _client(other_ca.public_bytes(Encoding.PEM), port)


def test_tls_expired_server_cert_fails(certs: pki.CertPaths, tmp_path: Path) -> None:
    ca_key, ca = pki.load_private_key(certs.ca_key), pki.load_cert(certs.ca_crt)
    now = dt.datetime.now(UTC)
    key, cert = pki.issue_server_cert(
        ca_key, ca, [], ["127.0.0.1"],
        not_valid_before=now - dt.timedelta(days=10), not_valid_after=now - dt.timedelta(hours=1),
    )
    pki.write_cert(tmp_path / "old.crt", cert)
    pki.write_private_key(tmp_path / "old.key", key)
    with tls_server(tmp_path / "old.crt", tmp_path / "old.key") as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            _client(certs.ca_crt, port)


def test_tls_cert_without_loopback_san_fails_for_127_0_0_1(certs: pki.CertPaths, tmp_path: Path) -> None:
    """The Flower SuperExec failure mode (reference 4.2): DNS:localhost only, client dials 127.0.0.1."""
    ca_key, ca = pki.load_private_key(certs.ca_key), pki.load_cert(certs.ca_crt)
    key, cert = pki.issue_server_cert(ca_key, ca, ["localhost"], [], include_loopback=False)
    assert ipaddress.ip_address("127.0.0.1") not in cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.IPAddress)
    pki.write_cert(tmp_path / "dns.crt", cert)
    pki.write_private_key(tmp_path / "dns.key", key)
    with tls_server(tmp_path / "dns.crt", tmp_path / "dns.key") as port:
        assert _client(certs.ca_crt, port, "localhost") == b"ok\n"
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            _client(certs.ca_crt, port, "127.0.0.1")


def test_rsa_key_type_works_for_tls(tmp_path: Path) -> None:
    paths = pki.init_ca(tmp_path, ["coord.example.org"], [], key_type="rsa")
    assert pki.show(tmp_path)[1].key_type.startswith("RSA")
    with tls_server(paths.coordinator_crt, paths.coordinator_key) as port:
        assert _client(paths.ca_crt, port) == b"ok\n"


# ------------------------------------------------------------------ site key custody: request at the site, sign here


def _private_key_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                  and (b"PRIVATE KEY" in p.read_bytes()))


def test_request_and_sign_leave_no_site_private_key_on_the_coordinator(tmp_path):
    from fedseek.ops.pki.requests import request_site, sign_request

    certs, site_dir = tmp_path / "coordinator" / "certs", tmp_path / "hospital-a-host"
    pki.init_ca(certs, hosts=[], ips=[])
    req = request_site(site_dir, "hospital-a")
    assert oct(req.node_key.stat().st_mode & 0o777) == "0o600" and oct(req.tls_key.stat().st_mode & 0o777) == "0o600"
    signed = sign_request(certs, req.csr, req.node_pub)
    assert _private_key_files(tmp_path / "coordinator") == ["certs/ca.key", "certs/coordinator.key"]
    assert sorted(p.name for p in _private_key_files_paths(site_dir)) == ["hospital-a", "hospital-a.tls.key"]  # all here
    cert = pki.load_cert(signed.cert)
    pki.verify_chain(certs / pki.CA_CRT, cert)
    assert "CN=hospital-a" in cert.subject.rfc4514_string()
    tls_key = pki.load_private_key(req.tls_key)
    from fedseek.ops.pki.keys import same_public_key

    assert same_public_key(cert.public_key(), tls_key.public_key())
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 29 <= days <= 31  # short-lived by default


def _private_key_files_paths(root):
    return [p for p in root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


def test_sign_refuses_forged_requests_and_identity_swaps(tmp_path):
    from cryptography.hazmat.primitives import serialization

    from fedseek.ops.pki.requests import request_site, sign_request

    certs = tmp_path / "certs"
    pki.init_ca(certs, hosts=[], ips=[])
    a, b = request_site(tmp_path / "a", "site-a"), request_site(tmp_path / "b", "site-b")
    forged = tmp_path / "forged.csr"
    pem = bytearray(a.csr.read_bytes())
    pem[len(pem) // 2] ^= 1  # one flipped bit in the base64 body
    forged.write_bytes(bytes(pem))
    with pytest.raises(pki.PkiError):
        sign_request(certs, forged, a.node_pub)
    with pytest.raises(pki.PkiError, match="not an OpenSSH public key"):
        sign_request(certs, a.csr, a.csr)
    sign_request(certs, a.csr, a.node_pub)
    with pytest.raises(pki.PkiError, match="already registered with another node key"):
        sign_request(certs, a.csr, b.node_pub)  # site-a's name with site-b's node key
    assert (certs / "sites" / "site-a" / "site-a.pub").read_bytes() == a.node_pub.read_bytes()
    rsa_pub = tmp_path / "rsa.pub"
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_pub.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(pki.PkiError, match="ECDSA"):
        sign_request(certs, b.csr, rsa_pub)


def test_renew_issues_a_new_serial_for_the_same_key_and_revoke_lists_every_serial(tmp_path):
    import json

    from fedseek.ops.pki.requests import renew_site, request_site, revoke_site, sign_request

    certs = tmp_path / "certs"
    pki.init_ca(certs, hosts=[], ips=[])
    req = request_site(tmp_path / "site", "bank-a")
    first = sign_request(certs, req.csr, req.node_pub, days=1)
    second = renew_site(certs, "bank-a", days=60)
    assert first.serial != second.serial
    assert pki.load_cert(second.cert).public_key().public_bytes(*_spki()) == \
        pki.load_private_key(req.tls_key).public_key().public_bytes(*_spki())
    assert sorted(revoke_site(certs, "bank-a")) == sorted([first.serial, second.serial])
    revoked = json.loads((certs / "revoked.json").read_text())
    assert set(revoked["serials"]) == {first.serial, second.serial} and "bank-a" in revoked["sites"]
    assert revoke_site(certs, "bank-a") == []  # idempotent
    with pytest.raises(pki.PkiError, match="no certificate was issued"):
        revoke_site(certs, "bank-z")
    with pytest.raises(pki.PkiError, match="no request kept"):
        renew_site(certs, "bank-z")


def _spki():
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
