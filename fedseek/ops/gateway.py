"""Fleet-only TLS gateway: the sites' one entry point to the coordinator, with Flower's Control API kept off it.

Flower 1.41 serves three APIs on ONE port: Fleet (SuperNodes), Control (the operator: `flwr
run/stop/log`, `flwr supernode register/unregister`; unauthenticated in the open-source build)
and the SuperExec's Runtime API. Whoever reaches that port with the CA can therefore push code
that every site executes. With the gateway, the SuperLink binds 127.0.0.1 only and this process
listens on the public interface with the coordinator's certificate. It forwards a request to the
SuperLink (over TLS, verified with the federation CA) only if it is `POST /v1/fleet/<rpc>` for a
known Fleet RPC with a single Content-Length body; anything else (Control, Runtime, /docs,
/openapi.json, other methods, chunked or ambiguous framing) gets 403 and the connection is closed.

Run by `fedseek coordinator start` when the coordinator config has a `gateway:` section:
`python -m fedseek.ops.gateway --listen 0.0.0.0:9092 --upstream 127.0.0.1:9192 --certfile ... --keyfile ... --cafile ...`
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import ssl
import sys

log = logging.getLogger("fedseek.ops.gateway")

#: Fleet RPCs of Flower 1.41 (flwr/superlink/routers/fleet): the only paths forwarded.
FLEET_RPCS: frozenset[str] = frozenset({
    "activate-node", "confirm-message-received", "deactivate-node", "get-fab", "get-run", "pull-messages",
    "pull-object", "push-messages", "push-object", "register-node", "send-node-heartbeat", "unregister-node",
})
MAX_HEAD_BYTES = 16 * 1024
IDLE_TIMEOUT_S = 300.0
_TARGET = re.compile(r"^/v1/fleet/([a-z-]+)$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Refused(Exception):
    """A request the gateway will not forward; the message is the logged reason."""


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    """Split an HTTP/1.1 request or response head into (first-line parts, headers); strict: Refused on anything odd."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise Refused("undecodable head") from None
    lines = text[:-4].split("\r\n") if text.endswith("\r\n\r\n") else text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) != 3:
        raise Refused(f"malformed first line {lines[0][:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" or ":" not in line:
            raise Refused("folded or malformed header line")
        name, value = line.split(":", 1)
        if not _TOKEN.match(name):
            raise Refused(f"invalid header name {name[:40]!r}")
        headers.append((name.lower(), value.strip()))
    return parts[0], parts[1], parts[2], headers


def check_request(method: str, target: str, version: str, headers: list[tuple[str, str]], max_body: int) -> int:
    """The body length of a request the gateway may forward; Refused (with the reason) otherwise."""
    if version != "HTTP/1.1":
        raise Refused(f"version {version[:20]!r}")
    m = _TARGET.match(target)
    if method != "POST" or not m or m.group(1) not in FLEET_RPCS:
        raise Refused(f"{method[:10]} {target[:120]} is not a Fleet RPC")
    names = [n for n, _ in headers]
    if "transfer-encoding" in names:
        raise Refused("Transfer-Encoding in a request (only Content-Length bodies are forwarded)")
    lengths = [v for n, v in headers if n == "content-length"]
    if len(lengths) != 1 or not lengths[0].isdigit():
        raise Refused("a request needs exactly one numeric Content-Length")
    length = int(lengths[0])
    if length > max_body:
        raise Refused(f"body of {length} bytes exceeds the {max_body}-byte limit")
    return length


def _keep_alive(headers: list[tuple[str, str]]) -> bool:
    """Whether the peer lets the connection be reused (no `Connection: close`)."""
    return not any(n == "connection" and "close" in v.lower() for n, v in headers)


async def _read_head(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """One HTTP head (through the blank line), None at a clean EOF; Refused if too large."""
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise Refused("connection closed inside a request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise Refused(f"head larger than {MAX_HEAD_BYTES} bytes") from None


async def _relay_response(up: asyncio.StreamReader, down: asyncio.StreamWriter) -> bool:
    """Copy one response from the SuperLink to the site; returns whether the connection may be reused."""
    head = await _read_head(up, IDLE_TIMEOUT_S)
    if head is None:
        raise ConnectionError("the SuperLink closed the connection")
    _version, status, _reason, headers = parse_head(head)
    down.write(head)
    chunked = any(n == "transfer-encoding" and "chunked" in v.lower() for n, v in headers)
    lengths = [v for n, v in headers if n == "content-length"]
    if status.startswith("1") or status in ("204", "304"):
        pass
    elif chunked:
        while True:
            size_line = await up.readuntil(b"\r\n")
            down.write(size_line)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    line = await up.readuntil(b"\r\n")
                    down.write(line)
                    if line == b"\r\n":
                        break
                break
            down.write(await up.readexactly(size + 2))
            await down.drain()
    elif lengths:
        remaining = int(lengths[0])
        while remaining:
            chunk = await up.read(min(remaining, 1 << 20))
            if not chunk:
                raise ConnectionError("the SuperLink closed the connection mid-response")
            down.write(chunk)
            remaining -= len(chunk)
            await down.drain()
    else:  # delimited by close
        while chunk := await up.read(1 << 20):
            down.write(chunk)
        await down.drain()
        return False
    await down.drain()
    return _keep_alive(headers)


class Gateway:
    """The Fleet-only TLS reverse proxy in front of a loopback SuperLink."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], certfile: str, keyfile: str, cafile: str,
                 max_body: int = 512 * 1024 * 1024) -> None:
        """TLS server context from the coordinator's cert/key; client context trusting only the federation CA."""
        self.listen, self.upstream, self.max_body = listen, upstream, max_body
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_ctx.load_cert_chain(certfile, keyfile)
        self.client_ctx = ssl.create_default_context(cafile=cafile)
        self.refused = 0
        self.forwarded = 0

    async def _forward_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        """Screen and forward the site's requests one by one over one upstream connection; 403 and close on a refusal."""
        up_reader: asyncio.StreamReader | None = None
        up_writer: asyncio.StreamWriter | None = None
        try:
            while True:
                try:
                    head = await _read_head(reader, IDLE_TIMEOUT_S)
                    if head is None:
                        return
                    method, target, version, headers = parse_head(head)
                    length = check_request(method, target, version, headers, self.max_body)
                except Refused as exc:
                    self.refused += 1
                    log.warning("refused %s: %s", peer, exc)
                    body = b"fedseek gateway: only the Fleet API is served here\n"
                    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    await writer.drain()
                    return
                if up_writer is None:
                    up_reader, up_writer = await asyncio.open_connection(
                        self.upstream[0], self.upstream[1], ssl=self.client_ctx, server_hostname=self.upstream[0],
                        limit=MAX_HEAD_BYTES)
                up_writer.write(head)
                remaining = length
                while remaining:  # stream the body: model updates can be large
                    chunk = await asyncio.wait_for(reader.read(min(remaining, 1 << 20)), IDLE_TIMEOUT_S)
                    if not chunk:
                        raise ConnectionError("the site closed the connection mid-request")
                    up_writer.write(chunk)
                    remaining -= len(chunk)
                    await up_writer.drain()
                await up_writer.drain()
                self.forwarded += 1
                assert up_reader is not None
                if not await _relay_response(up_reader, writer) or not _keep_alive(headers):
                    return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError, ValueError) as exc:
            log.info("connection from %s ended: %s", peer, type(exc).__name__)
        finally:
            for w in (up_writer, writer):
                if w is not None:
                    w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One site connection."""
        host, port = (writer.get_extra_info("peername") or ("?", "?"))[:2]
        peer = f"{host}:{port}"
        try:
            await self._forward_loop(reader, writer, peer)
        except asyncio.CancelledError:  # shutdown: open keep-alive connections are dropped quietly
            writer.close()

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set."""
        server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1], ssl=self.server_ctx,
                                            limit=MAX_HEAD_BYTES, ssl_handshake_timeout=30)
        log.info("fedseek gateway on https://%s:%d -> SuperLink https://%s:%d (Fleet API only)",
                 self.listen[0], self.listen[1], self.upstream[0], self.upstream[1])
        async with server:
            await stop.wait()
        log.info("gateway stopped: %d requests forwarded, %d refused", self.forwarded, self.refused)


def _address(text: str) -> tuple[str, int]:
    """host:port (IPv6 as [addr]:port) as (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    """`python -m fedseek.ops.gateway`: run the gateway in the foreground until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(prog="fedseek-gateway", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="host:port the sites connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback host:port")
    p.add_argument("--certfile", required=True)
    p.add_argument("--keyfile", required=True)
    p.add_argument("--cafile", required=True, help="federation CA (verifies the SuperLink)")
    p.add_argument("--max-body-mb", type=int, default=512)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    gw = Gateway(_address(args.listen), _address(args.upstream), args.certfile, args.keyfile, args.cafile,
                 max_body=args.max_body_mb * 1024 * 1024)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await gw.serve(stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
