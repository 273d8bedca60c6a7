"""E2B's network config through the official Python SDK: the shapes the SDK sends for
``network=`` at create and for ``update_network``, and what the server does with them
that is visible from the SDK's side (no traffic leaves this machine here: the egress
rules' effect on real connections is tested against test hosts in a network namespace
by tests/tests/network_policy.rs).

Coverage (test -> behaviour)
  test_egress_rules_at_create_and_update    network={"allow_out", "deny_out"} creates;
                                            update_network (instance and class method)
                                            answers, replacing the rules, host names
                                            and wildcards included; 400 for what cannot
                                            be a rule, 501 for egress_proxy
  test_public_traffic_off_needs_the_token   allow_public_traffic=False: the sandbox's
                                            traffic_access_token, required on get_host()
                                            traffic as e2b-traffic-access-token; the
                                            Host seen inside is mask_request_host's
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from e2b import Sandbox
from test_sdk import http_get_via_host, proxy_target, wait_until

TIMEOUT = 120


def test_egress_rules_at_create_and_update():
    sbx = Sandbox.create(
        "base",
        timeout=TIMEOUT,
        network={"allow_out": ["198.51.100.10"], "deny_out": ["198.51.100.0/24"]},
    )
    try:
        assert sbx.commands.run("echo ok").stdout == "ok\n"
        sbx.update_network({"deny_out": ["0.0.0.0/0"], "allow_out": ["198.51.100.0/24"]})
        Sandbox.update_network(sbx.sandbox_id, {})
        sbx.update_network({"allow_internet_access": False})
        # Host names and wildcards go in allow_out (decided by the egress proxy); one in
        # deny_out is the client's mistake, and so is what is neither.
        sbx.update_network({"allow_out": ["api.example.com", "*.cdn.example.com"], "deny_out": ["0.0.0.0/0"]})
        with pytest.raises(Exception) as bad:
            sbx.update_network({"deny_out": ["example.com"]})
        assert "denyOut" in str(bad.value), bad.value
        with pytest.raises(Exception) as bad:
            sbx.update_network({"allow_out": ["http://not a host"]})
        assert "not an address" in str(bad.value), bad.value
        # What this server cannot do is said, not ignored.
        with pytest.raises(Exception) as unsupported:
            sbx.update_network({"egress_proxy": {"address": "198.51.100.10:1080"}})
        assert "not supported" in str(unsupported.value), unsupported.value
        # Still running and usable after the refused updates.
        assert sbx.commands.run("echo still").stdout == "still\n"
    finally:
        sbx.kill()


ECHO_HOST = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.headers.get("Host") or "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


def test_public_traffic_off_needs_the_token():
    sbx = Sandbox.create(
        "base",
        timeout=TIMEOUT,
        network={"allow_public_traffic": False, "mask_request_host": "${PORT}-masked.test"},
    )
    try:
        token = sbx.traffic_access_token
        assert isinstance(token, str) and len(token) >= 16, token
        path = f"/tmp/echo-{uuid.uuid4().hex[:8]}.py"
        sbx.files.write(path, ECHO_HOST)
        server = sbx.commands.run(f"python3 {path}", background=True, timeout=0)
        try:
            host = sbx.get_host(8000)
            target, host_header = proxy_target(host)

            def get(extra):
                headers = {"Host": host_header} if host_header else {}
                headers.update(extra)
                with httpx.Client(trust_env=False, timeout=10) as client:
                    return client.get(f"http://{target}/", headers=headers)

            resp = wait_until(
                lambda: (lambda r: r if r.status_code != 502 else None)(
                    get({"e2b-traffic-access-token": token})
                ),
                "the sandbox's server to answer through get_host(8000)",
                60,
                0.5,
            )
            assert resp.status_code == 200, resp.text
            assert resp.text == "8000-masked.test"
            assert get({}).status_code == 403
            assert get({"e2b-traffic-access-token": "wrong"}).status_code == 403
            assert http_get_via_host(host, "/").status_code == 403
            # The SDK's own traffic (envd) needs no traffic token.
            assert sbx.commands.run("echo ok").stdout == "ok\n"
        finally:
            server.kill()
    finally:
        sbx.kill()
