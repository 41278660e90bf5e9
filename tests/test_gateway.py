"""The Fleet-only gateway: request screening, and forwarding over real TLS sockets (the deployed path is in test_deploy.py)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from fedseek.ops import pki
from fedseek.ops.gateway import FLEET_RPCS, Gateway, Refused, check_request, parse_head

MAX = 1024


def _check(head: bytes) -> int:
    return check_request(*parse_head(head), max_body=MAX)


def test_fleet_rpc_with_content_length_is_forwarded() -> None:
    head = b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nflwr-public-key: abc\r\n\r\n"
    assert _check(head) == 12
    assert "push-messages" in FLEET_RPCS and "start-run" not in FLEET_RPCS


@pytest.mark.parametrize("head, reason", [
    (b"POST /v1/control/start-run HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "not a Fleet RPC"),
    (b"GET /docs HTTP/1.1\r\n\r\n", "not a Fleet RPC"),
    (b"GET /v1/fleet/pull-messages HTTP/1.1\r\n\r\n", "not a Fleet RPC"),
    (b"POST /v1/fleet/../control/list-runs HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "not a Fleet RPC"),
    (b"POST /v1/fleet/%2e%2e/control HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "not a Fleet RPC"),
    (b"POST /v1/fleet/pull-messages?x=1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "not a Fleet RPC"),
    (b"POST /v1/fleet/no-such-rpc HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "not a Fleet RPC"),
    (b"POST /v1/fleet/pull-messages HTTP/1.0\r\nContent-Length: 0\r\n\r\n", "version"),
    (b"POST /v1/fleet/pull-messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding"),
    (b"POST /v1/fleet/pull-messages HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "exactly one"),
    (b"POST /v1/fleet/pull-messages HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "exactly one"),
    (b"POST /v1/fleet/pull-messages HTTP/1.1\r\n\r\n", "exactly one"),
    (b"POST /v1/fleet/pull-messages HTTP/1.1\r\nContent-Length: 4096\r\n\r\n", "limit"),
    (b"POST /v1/fleet/pull-messages HTTP/1.1\r\nContent-Length: 0\r\n folded\r\n\r\n", "folded"),
    (b"POST /v1/fleet/pull-messages HTTP/1.1\r\nBad Name: 1\r\nContent-Length: 0\r\n\r\n", "invalid header name"),
    (b"POST\r\n\r\n", "malformed first line"),
])
def test_everything_else_is_refused(head: bytes, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        _check(head)


# --------------------------------------------------------------------------- over real TLS sockets


async def _upstream(ctx: ssl.SSLContext, seen: list[bytes]) -> asyncio.Server:
    """A stand-in SuperLink: echoes each request body, chunked for push-messages, Content-Length otherwise."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                _, target, _, headers = parse_head(head)
                body = await reader.readexactly(int(dict(headers)["content-length"]))
                seen.append(target.encode() + b" " + body)
                reply = b"echo:" + body
                if target.endswith("push-messages"):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + f"{len(reply):x}\r\n".encode() + reply + b"\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\n" + f"Content-Length: {len(reply)}\r\n\r\n".encode() + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


async def _read_response(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """(status, body) of one response, Content-Length or chunked."""
    _, status, _, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
    fields = dict(headers)
    if "content-length" in fields:
        return status, await reader.readexactly(int(fields["content-length"]))
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        body += (await reader.readexactly(size + 2))[:-2]
    await reader.readuntil(b"\r\n")
    return status, body


async def _through_gateway(certs: pki.CertPaths) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.coordinator_crt, certs.coordinator_key)
    seen: list[bytes] = []
    upstream = await _upstream(server_ctx, seen)
    up_port = upstream.sockets[0].getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gw_port = s.getsockname()[1]
    gw = Gateway(("127.0.0.1", gw_port), ("127.0.0.1", up_port), str(certs.coordinator_crt), str(certs.coordinator_key),
                 str(certs.ca_crt))
    stop = asyncio.Event()
    serving = asyncio.create_task(gw.serve(stop))
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_crt))

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for _ in range(100):
            try:
                return await asyncio.open_connection("127.0.0.1", gw_port, ssl=client_ctx, server_hostname="127.0.0.1")
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("the gateway never listened")

    try:
        reader, writer = await connect()
        for rpc, body in (("pull-messages", b"hello"), ("push-messages", b"x" * 3000)):  # two requests, one connection
            writer.write(f"POST /v1/fleet/{rpc} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            assert await _read_response(reader) == ("200", b"echo:" + body)
        writer.close()

        reader, writer = await connect()
        writer.write(b"POST /v1/control/start-run HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        status, body = await _read_response(reader)
        assert status == "403" and b"only the Fleet API" in body
        assert await reader.read() == b""  # and the connection is closed
        writer.close()
    finally:
        stop.set()
        await serving
        upstream.close()
    assert seen == [b"/v1/fleet/pull-messages hello", b"/v1/fleet/push-messages " + b"x" * 3000]  # Control never reached it
    assert (gw.forwarded, gw.refused) == (2, 1)


def test_gateway_forwards_fleet_rpcs_over_tls_and_refuses_the_rest(tmp_path: Path) -> None:
    certs = pki.init_ca(tmp_path / "certs", hosts=[], ips=[])
    asyncio.run(asyncio.wait_for(_through_gateway(certs), 30))
