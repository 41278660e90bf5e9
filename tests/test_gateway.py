"""The Fleet-only gateway's request screening (fast; the end-to-end path is in test_deploy.py)."""

from __future__ import annotations

import pytest

from fedseek.ops.gateway import FLEET_RPCS, Refused, check_request, parse_head

MAX = 1024


def _check(head: bytes) -> int:
    return check_request(*parse_head(head), max_body=MAX)


def test_fleet_rpc_with_content_length_is_forwarded():
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
def test_everything_else_is_refused(head, reason):
    with pytest.raises(Refused, match=reason):
        _check(head)
