"""The site proxy: the SuperNode's HTTPS peer on loopback, carrying each Fleet call over gRPC with mutual TLS.

It listens on 127.0.0.1 only (uvicorn, with a loopback certificate the SuperNode trusts), accepts
`POST /v1/fleet/<rpc>` for the Fleet RPCs and nothing else, and sends the body unchanged to the
coordinator endpoint on one gRPC channel authenticated with the site's certificate. The
SuperLink's status, headers and body come back unchanged; transport faults become the codes Flower
retries (503 outage, 504 deadline), a refused identity becomes 401 (the SuperNode stops).

`FEDSEEK_TRANSPORT_TRACE=1` in its environment logs every call (RPC, sizes, status, milliseconds); the
endpoint logs the SuperLink's own time per call the same way.

Run by `fedseek site start`: `python -m fedseek.ops.transport.site_proxy --port P --coordinator HOST:PORT
--cafile ca.crt --certfile NAME.crt --keyfile NAME.tls.key --loopback-dir DIR`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from fedseek.ops.transport.fleet import (
    DEADLINE_STATUS,
    FLEET_RPCS,
    OUTAGE_STATUS,
    STATUS_KEY,
    from_metadata,
    metadata_value,
    method_path,
    request_metadata,
    rpc_of_path,
)

log = logging.getLogger("fedseek.ops.transport.site_proxy")
_STATUS_OF_CODE = {
    grpc.StatusCode.UNAVAILABLE: OUTAGE_STATUS,
    grpc.StatusCode.DEADLINE_EXCEEDED: DEADLINE_STATUS,
    grpc.StatusCode.CANCELLED: OUTAGE_STATUS,
    grpc.StatusCode.PERMISSION_DENIED: 401,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNIMPLEMENTED: 404,
}

Scope = dict[str, Any]


class SiteProxy:
    """An ASGI app forwarding Fleet calls to the coordinator endpoint (see the module docstring)."""

    def __init__(self, coordinator: str, *, cafile: str, certfile: str, keyfile: str,
                 max_message_bytes: int = 64 * 1024 * 1024, call_timeout_s: float = 120.0):
        self.coordinator = coordinator
        self._creds = grpc.ssl_channel_credentials(root_certificates=Path(cafile).read_bytes(),
                                                   private_key=Path(keyfile).read_bytes(),
                                                   certificate_chain=Path(certfile).read_bytes())
        self.max_message_bytes = max_message_bytes
        self.call_timeout_s = call_timeout_s
        self._channel: grpc.Channel | None = None
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable] = {}

    def _connect(self) -> None:
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 3000),
                   ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000)]
        # the synchronous channel, called from worker threads (it measured a little faster per call than grpc.aio here)
        self._channel = grpc.secure_channel(self.coordinator, self._creds, options=options)
        self._calls = {rpc: self._channel.unary_unary(method_path(rpc)) for rpc in FLEET_RPCS}

    async def close(self) -> None:
        """Close the gRPC channel."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        rpc = rpc_of_path(scope.get("path", ""))
        if scope.get("method") != "POST" or rpc is None:
            await _respond(send, 404, [], b"fedseek site proxy: only the Fleet API\n")
            return
        body = await _read_body(receive, self.max_message_bytes)
        if body is None:
            log.warning("%s: request body larger than %d bytes, refused", rpc, self.max_message_bytes)
            await _respond(send, 413, [], b"request larger than the federation's message limit\n")
            return
        try:
            metadata = request_metadata((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", []))
        except ValueError as exc:
            await _respond(send, 400, [], f"{exc}\n".encode())
            return
        t0 = time.perf_counter()
        status, headers, content = await self._forward(rpc, body, metadata)
        await _respond(send, status, headers, content)
        log.debug("%s %d bytes -> %d, %d bytes in %.1f ms", rpc, len(body), status, len(content), (time.perf_counter() - t0) * 1000)

    async def _forward(self, rpc: str, body: bytes, metadata: list[tuple[str, str]]) -> tuple[int, list[tuple[str, str]], bytes]:
        import asyncio

        if self._channel is None:
            self._connect()
        call = functools.partial(self._calls[rpc].with_call, body, metadata=metadata, timeout=self.call_timeout_s)
        try:
            content, done = await asyncio.get_running_loop().run_in_executor(None, call)
            trailing = done.trailing_metadata()
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            status = _STATUS_OF_CODE.get(code, 502)
            log.warning("%s: %s (%s) -> HTTP %d", rpc, code.name, details, status)
            return status, [("content-type", "text/plain")], f"fedseek transport: {code.name}: {details}\n".encode()
        status_text = metadata_value(trailing, STATUS_KEY)
        status = int(status_text) if status_text and status_text.isdigit() else 502
        return status, from_metadata(trailing), bytes(content)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._connect()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds `limit` (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Any, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def uvicorn_config(app: SiteProxy, port: int, certfile: str, keyfile: str) -> Any:
    """uvicorn on 127.0.0.1 only, TLS with the loopback certificate, bounded heads and idle connections."""
    import uvicorn

    return uvicorn.Config(app, host="127.0.0.1", port=port, ssl_certfile=certfile, ssl_keyfile=keyfile, lifespan="on",
                          log_level="warning", access_log=False, timeout_keep_alive=30,
                          limit_concurrency=64, server_header=False, date_header=False)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: serve until SIGTERM/SIGINT (uvicorn handles both)."""
    import uvicorn

    from fedseek.ops.transport.loopback_tls import ensure_loopback_tls

    p = argparse.ArgumentParser(prog="fedseek-site-proxy", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="loopback port the SuperNode connects to")
    p.add_argument("--coordinator", required=True, help="the coordinator endpoint host:port")
    p.add_argument("--cafile", required=True, help="federation CA (verifies the coordinator)")
    p.add_argument("--certfile", required=True, help="this site's certificate")
    p.add_argument("--keyfile", required=True, help="this site's TLS private key")
    p.add_argument("--loopback-dir", required=True, help="where the loopback certificate lives")
    p.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--call-timeout-s", type=float, default=120.0)
    a = p.parse_args(argv)
    level = logging.DEBUG if os.environ.get("FEDSEEK_TRANSPORT_TRACE") == "1" else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls = ensure_loopback_tls(Path(a.loopback_dir))
    app = SiteProxy(a.coordinator, cafile=a.cafile, certfile=a.certfile, keyfile=a.keyfile,
                    max_message_bytes=a.max_message_bytes, call_timeout_s=a.call_timeout_s)
    log.info("site proxy on 127.0.0.1:%d -> %s (gRPC, mutual TLS)", a.port, a.coordinator)
    server = uvicorn.Server(uvicorn_config(app, a.port, str(tls.cert), str(tls.key)))
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
