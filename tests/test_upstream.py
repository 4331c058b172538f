"""The road to the upstream: proxies from the environment (through a real tinyproxy), the CAs in
SSL_CERT_FILE (a TLS fake upstream with a CA made by openssl), and failures logged with their
cause."""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.netutil

from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.settings import Settings
from tornado_sse.upstream import choose, proxy_for

from .conftest import with_settings
from .sseclient import ask, parse_events, serving
from .test_cli import CLEAN_ENV, fetch, running

# The environment the server starts with: none of this machine's proxy or CA variables.
BARE_ENV = {k: v for k, v in CLEAN_ENV.items()
            if not k.lower().endswith("_proxy") and not k.startswith("SSL_CERT_")}


# -- which proxy applies (urllib's rules) ----------------------------------------------------------

@pytest.mark.parametrize("url, proxies, expected", [
    ("https://api.openai.com/v1", {"https": "http://proxy:3128"}, "http://proxy:3128"),
    ("https://api.openai.com/v1", {"http": "http://proxy:3128"}, None),
    ("http://127.0.0.1:11434/v1", {"all": "http://proxy:3128"}, "http://proxy:3128"),
    ("https://api.openai.com/v1", {"https": "http://p:1", "no": "openai.com"}, None),
    ("https://api.openai.com/v1", {"https": "http://p:1", "no": ".openai.com"}, None),
    ("https://api.openai.com/v1", {"https": "http://p:1", "no": "*"}, None),
    ("https://api.openai.com/v1", {"https": "http://p:1", "no": "example.com, localhost"}, "http://p:1"),
    ("http://127.0.0.1:8000/v1", {"http": "http://p:1", "no": "127.0.0.1"}, None),
    ("http://127.0.0.1:8000/v1", {"http": "http://p:1", "no": "127.0.0.1:9000"}, "http://p:1"),
    ("https://api.openai.com/v1", {}, None),
])
def test_a_proxy_applies_by_the_standard_librarys_rules(url, proxies, expected) -> None:
    assert proxy_for(url, proxies) == expected


def test_proxy_variables_are_read_like_urllib_reads_them() -> None:
    environ = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "NO_PROXY": "x.org",
               "HTTP_PROXY": "http://p:3", "FOO_PROXY": "", "OTHER": "1"}
    settings = Settings().with_environment(environ)
    assert dict(settings.proxies) == {"https": "http://lower:2", "no": "x.org", "http": "http://p:3"}
    cgi = Settings().with_environment({"HTTP_PROXY": "http://from-a-header:1", "REQUEST_METHOD": "GET"})
    assert dict(cgi.proxies) == {}


def test_a_proxy_password_is_in_no_repr_and_no_reason() -> None:
    settings = Settings().with_environment({"HTTPS_PROXY": "http://user:s3cret@proxy:3128"})
    assert "s3cret" not in repr(settings)
    assert choose(settings, "https://api.openai.com/v1") == (
        "aiohttp", "the proxy http://proxy:3128 applies to api.openai.com")


# -- through a real proxy --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def tinyproxy(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Debian's tinyproxy in the foreground on a free loopback port; yields its port and log."""
    port, log = free_port(), tmp_path / "tinyproxy.log"
    config = tmp_path / "tinyproxy.conf"
    config.write_text(f'Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile "{log}"\nLogLevel Info\n'
                      "Allow 127.0.0.1\nMaxClients 20\n")
    proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "tinyproxy exited: " + (log.read_text() if log.exists() else "")
                assert time.monotonic() < deadline, "tinyproxy did not start listening"
                time.sleep(0.05)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def demo_upstream() -> Iterator[str]:
    """The fake upstream as a process of its own (the server under test is one too)."""
    proc = subprocess.Popen([sys.executable, "-m", "tornado_sse.demo", "--port", "0", "--tokens", "5",
                             "--first-token-delay", "0", "--token-delay", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield re.search(r"(http://\S+/v1)", proc.stdout.readline()).group(1)  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def proxied_posts(log: Path) -> list[str]:
    return re.findall(r"Request \(file descriptor \d+\): (POST \S+)", log.read_text() if log.exists() else "")


def test_with_http_proxy_set_the_question_goes_through_the_proxy(tmp_path: Path) -> None:
    with tinyproxy(tmp_path) as (proxy_port, log), demo_upstream() as base_url:
        env = {**BARE_ENV, "OPENAI_BASE_URL": base_url,
               "HTTP_PROXY": f"http://someone:s3cret@127.0.0.1:{proxy_port}"}
        with running(env=env) as (_, port, lines):
            events = parse_events(fetch(port, "/ask?question=hi"))
        assert "".join(d for e, d in events[1:-1] if e == "update") == "tok0 tok1 tok2 tok3 tok4 "
        assert events[-1] == ("update", "<END_STREAMING_SSE>")
        assert proxied_posts(log) == [f"POST {base_url}/chat/completions"]
    assert any(f"upstream transport: aiohttp (the proxy http://127.0.0.1:{proxy_port} applies to "
               "127.0.0.1)" in line for line in lines), lines
    assert "s3cret" not in "".join(lines)


def test_no_proxy_covering_the_upstream_goes_direct_on_the_fast_transport(tmp_path: Path) -> None:
    with tinyproxy(tmp_path) as (proxy_port, log), demo_upstream() as base_url:
        env = {**BARE_ENV, "OPENAI_BASE_URL": base_url, "HTTP_PROXY": f"http://127.0.0.1:{proxy_port}",
               "NO_PROXY": "example.com,127.0.0.1"}
        with running(env=env) as (_, port, lines):
            events = parse_events(fetch(port, "/ask?question=hi"))
        assert "".join(d for e, d in events[1:-1] if e == "update") == "tok0 tok1 tok2 tok3 tok4 "
        assert proxied_posts(log) == []
    assert any("upstream transport: fast (no proxy applies)" in line for line in lines), lines


# -- TLS: the CAs in SSL_CERT_FILE -----------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA of our own and a certificate for 127.0.0.1 it signed, made by openssl."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=tornado-sse test CA", "-keyout", "ca.key",
            "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-new", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                               "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                               "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "ext.cnf", "-out", "server.pem")
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem"), "key": str(d / "server.key")}


TLS_UPSTREAM = """
import asyncio, ssl, sys
import tornado.httpserver, tornado.netutil
from tornado_sse.demo import FakeUpstream, Script

async def main() -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(sys.argv[1], sys.argv[2])
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(FakeUpstream(Script(deltas=["over", " tls"])).make_app(),
                                          ssl_options=tls)
    server.add_sockets([sock])
    print(sock.getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_ssl_cert_file_is_the_trust_the_upstreams_certificate_is_checked_against(pki) -> None:
    upstream = subprocess.Popen([sys.executable, "-c", TLS_UPSTREAM, pki["cert"], pki["key"]],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert upstream.stdout is not None
        base_url = f"https://127.0.0.1:{int(upstream.stdout.readline())}/v1"
        env = {**BARE_ENV, "OPENAI_BASE_URL": base_url, "SSL_CERT_FILE": pki["ca"]}
        with running(env=env) as (_, port, _lines):
            events = parse_events(fetch(port, "/ask?question=hi"))
        assert events[1:3] == [("update", "over"), ("update", " tls")]
        assert events[-1] == ("update", "<END_STREAMING_SSE>")
    finally:
        upstream.kill()
        upstream.wait()
        upstream.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def tls_upstream(pki, io_loop) -> Iterator[str]:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki["cert"], pki["key"])
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server = tornado.httpserver.HTTPServer(FakeUpstream(Script(deltas=["over", " tls"])).make_app(),
                                          ssl_options=tls)
    server.add_sockets([sock])
    yield f"https://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.stop()


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tornado_sse.streams" and "failed" in r.getMessage()]


@pytest.mark.gen_test
@pytest.mark.parametrize("transport", ["fast", "aiohttp"])
async def test_a_certificate_nobody_trusts_is_logged_as_the_cause(settings, tls_upstream, pki, caplog,
                                                                   transport):
    trusting = with_settings(settings, base_url=tls_upstream, ssl_cert_file=pki["ca"],
                             upstream_transport=transport)
    async with serving(trusting) as ours:
        assert (await ask(ours, "question=q")).text == "over tls"
    untrusting = with_settings(trusting, ssl_cert_file=None)  # the system's CAs only
    with caplog.at_level(logging.WARNING, logger="tornado_sse.streams"):
        async with serving(untrusting) as ours:
            answer = await ask(ours, "question=q")
    assert [json.loads(e)["code"] for e in answer.errors] == ["upstream_unreachable"]
    assert answer.events[-1] == ("update", "<END_STREAMING_SSE>")
    [line] = failure_lines(caplog)
    assert "caused by Connect" in line and "CERTIFICATE_VERIFY_FAILED" in line, line


@pytest.mark.gen_test
@pytest.mark.parametrize("transport", ["fast", "aiohttp"])
async def test_a_refused_connection_is_logged_as_the_cause(settings, caplog, transport):
    closed = f"http://127.0.0.1:{free_port()}/v1"
    with caplog.at_level(logging.WARNING, logger="tornado_sse.streams"):
        async with serving(with_settings(settings, base_url=closed, upstream_transport=transport)) as ours:
            answer = await ask(ours, "question=q")
    assert [json.loads(e)["code"] for e in answer.errors] == ["upstream_unreachable"]
    [line] = failure_lines(caplog)
    assert "caused by Connect" in line and re.search(r"Connection ?refused", line, re.I), line


def test_an_unreadable_ssl_cert_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    env = {**BARE_ENV, "OPENAI_BASE_URL": "https://127.0.0.1:1/v1", "SSL_CERT_FILE": str(tmp_path / "nope.pem")}
    run = subprocess.run([sys.executable, "-m", "tornado_sse", "--port", "0"], capture_output=True,
                         text=True, env=env, timeout=30)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"cannot load the CA certificates in SSL_CERT_FILE '{tmp_path / 'nope.pem'}'" in run.stderr
