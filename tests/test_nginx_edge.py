"""The HTTP edge through a real nginx: a minimal HTTP/1.0 proxy_pass gets byte-exact frames; the
sample on a port other than 80 keeps it in Host, so sign-in and Stop pass the same-site check;
/metrics is denied and the access log holds no query string."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tornado_sse import sse

from .test_cli import CLEAN_ENV, running
from .test_deploy import DEPLOY, SERVER, nginx, tool


def reencoded(body: bytes) -> bytes:
    """The body's frames parsed and encoded again: equal to the body only if every frame is."""
    out = []
    for block in body.decode().split("\n\n")[:-1]:
        if block.startswith(":"):
            out.append(block.encode() + b"\n\n")
            continue
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            fields.setdefault(name, []).append(value)
        out.append(sse.encode_event(fields["event"][0], "\n".join(fields["data"]), fields["id"][0]))
    return b"".join(out)


def whole_answer(port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        return response.read()
    finally:
        conn.close()


def test_a_minimal_proxy_pass_speaking_http_1_0_gets_every_frame_byte_exact(tmp_path: Path) -> None:
    # nginx talks HTTP/1.0 to its upstream unless told otherwise (proxy_http_version's default).
    tool("nginx")
    with running("--backend", "demo", "--rate-limit", "0") as (_, server, _):
        minimal = f"server {{\n    listen 80;\n    location / {{ proxy_pass http://127.0.0.1:{server}; }}\n}}\n"
        with nginx(tmp_path, minimal) as port:
            body = whole_answer(port, "/ask?question=hi")
    assert body.endswith(b"data: <END_STREAMING_SSE>\n\n") and reencoded(body) == body
    assert body.count(b"\nevent: update\n") > 20 and b"\r\n" not in body


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_the_single_instance_sample_on_another_port_signs_in_streams_and_stops(tmp_path: Path) -> None:
    tool("nginx")
    token = "Lc3k9-TzqW0vXb7N_y2hRf8d"  # 24 url-safe characters: over the 128 bits asked for
    env = {**CLEAN_ENV, "TORNADO_SSE_ACCESS_TOKEN": token}
    with running(*SERVER, env=env) as (_, server, _), \
            nginx(tmp_path, (DEPLOY / "nginx.conf").read_text().replace("127.0.0.1:8888", f"127.0.0.1:{server}")) as port:
        origin = f"http://127.0.0.1:{port}"  # not :80, and the Origin says so
        signed_in = post(port, "/login", b"token=" + token.encode(),
                         {"Origin": origin, "Content-Type": "application/x-www-form-urlencoded"})
        assert signed_in.status == 303, signed_in.status  # 403 cross_site when Host lost the port
        cookie = (signed_in.getheader("Set-Cookie") or "").split(";")[0]
        browser = {"Cookie": cookie, "Sec-Fetch-Site": "same-origin"}
        body = whole_answer(port, "/ask?question=secret%20words", browser)
        assert reencoded(body) == body and body.endswith(b"data: <END_STREAMING_SSE>\n\n")

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/ask?question=a%20long%20one", headers=browser)
        response = conn.getresponse()
        line = b""
        while not line.startswith(b"data: "):
            line = response.readline()
        meta = json.loads(line[len(b"data: "):])
        # The stream belongs to the browser that asked: Stop carries the owner cookie /ask set.
        owner = [c.split(";")[0] for c in response.headers.get_all("Set-Cookie") or []
                 if c.startswith("tornado_sse_owner=")]
        stopped = post(port, "/stop?" + urlencode({"stream": meta["stream"]}), b"",
                       {**browser, "Origin": origin, "Cookie": "; ".join([cookie, *owner])})
        assert stopped.status == 204
        rest = response.read()  # through nginx too, the reader's stream ends: finish, end frame
        assert b'event: finish\ndata: {"reason": "stopped"}\n\n' in rest
        assert rest.endswith(b"data: <END_STREAMING_SSE>\n\n")
        conn.close()

        metrics = post(port, "/metrics", b"", {})
        assert metrics.status == 403  # nginx's deny; tornado-sse refuses a proxied request too
    log = (tmp_path / "access.log").read_text()
    assert "GET /ask HTTP/1.1" in log and "POST /stop HTTP/1.1" in log
    assert "secret" not in log and "question" not in log and meta["stream"] not in log


@pytest.mark.parametrize("sample", ["nginx.conf", "nginx-multi.conf"])
def test_the_nginx_samples_keep_the_port_deny_metrics_and_log_no_query_string(sample: str) -> None:
    text = (DEPLOY / sample).read_text()
    assert "proxy_http_version 1.1;" in text and 'proxy_set_header Connection "";' in text
    assert "proxy_set_header Host $http_host;" in text and "$host;" not in text
    assert re.search(r"location = /metrics \{[^}]*\n\s+deny all;\n\s+\}", text)
    log_format = re.search(r"log_format tornado_sse (.*?);", text, re.DOTALL)
    assert log_format and "$uri" in log_format.group(1)
    assert not re.search(r"\$(request|request_uri|args|query_string|arg_\w+)\b", log_format.group(1))
    assert "access_log /var/log/nginx/access.log tornado_sse;" in text
