"""deploy/: the systemd units verify and stay hardened, the nginx samples load, and the
single-instance sample streams through a real nginx in front of a real server process. (The
several-instances sample, round-robin over instances sharing Redis: test_multi_instance.py.)"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tornado_sse.cli import SHUTDOWN_GRACE
from tornado_sse.settings import Settings

from .conftest import OWNER
from .sseclient import next_frame
from .test_cli import running

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
INSTALLED_AT = "/opt/tornado-sse/bin/tornado-sse"
# (file in deploy/, the name it is verified under: a template is verified as one instance)
UNITS = [("tornado-sse.service", "tornado-sse.service"), ("tornado-sse@.service", "tornado-sse@8001.service")]
SERVER = ("--backend", "demo", "--rate-limit", "0", "--trust-proxy-headers", "--resume-grace", "30")


def tool(name: str) -> str:
    """The tool's path; a missing tool skips on a developer machine and fails in CI."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run must install it")
        pytest.skip(f"{name} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- systemd ---------------------------------------------------------------------------------------

def unit_copy(source: str, name: str, directory: Path) -> Path:
    """The unit under `name`, its ExecStart pointing at the installed script (verify checks that
    the binary exists; in CI nothing is installed under /opt)."""
    text = (DEPLOY / source).read_text()
    assert f"ExecStart={INSTALLED_AT} " in text
    script = shutil.which("tornado-sse")
    assert script is not None, "the package is not installed: pip install -e ."
    path = directory / name
    path.write_text(text.replace(INSTALLED_AT, script))
    return path


def verify(unit: Path) -> list[str]:
    """What `systemd-analyze verify` says about this unit (it exits 0 on unknown keys and bad
    values, so the lines naming the unit are what counts)."""
    run = subprocess.run([tool("systemd-analyze"), "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    complaints = [line for line in (run.stdout + run.stderr).splitlines() if unit.stem in line]
    return complaints if run.returncode == 0 else [f"exit {run.returncode}", *complaints]


@pytest.mark.parametrize("source, name", UNITS)
def test_the_units_verify_without_a_single_complaint(source: str, name: str, tmp_path: Path) -> None:
    assert verify(unit_copy(source, name, tmp_path)) == []


def test_verify_catches_a_bad_value(tmp_path: Path) -> None:
    unit = unit_copy("tornado-sse.service", "tornado-sse.service", tmp_path)
    unit.write_text(unit.read_text().replace("WatchdogSec=30", "WatchdogSec=thirty"))
    assert any("thirty" in line for line in verify(unit))


@pytest.mark.parametrize("source, name", UNITS)
def test_the_units_are_hardened(source: str, name: str, tmp_path: Path) -> None:
    run = subprocess.run([tool("systemd-analyze"), "security", "--offline=true",
                          str(unit_copy(source, name, tmp_path))], capture_output=True, text=True,
                         timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
    assert match, run.stdout + run.stderr
    assert float(match.group(1)) <= 2.0


@pytest.mark.parametrize("source", [s for s, _ in UNITS])
def test_the_units_speak_notify_and_outwait_the_drain(source: str) -> None:
    text = (DEPLOY / source).read_text()
    settings = {k: v for k, _, v in re.findall(r"^(\w+)(=)(.*)$", text, re.MULTILINE)}
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["WatchdogSec"] == "30"
    assert float(settings["TimeoutStopSec"]) > Settings().drain_timeout + SHUTDOWN_GRACE
    assert "AF_UNIX" in settings["RestrictAddressFamilies"]  # the notification socket
    assert "EnvironmentFile=-/etc/tornado-sse.env" in text and "TORNADO_SSE_MAX_STREAMS" in text


def test_the_template_runs_one_loopback_instance_per_port() -> None:
    text = (DEPLOY / "tornado-sse@.service").read_text()
    assert f"ExecStart={INSTALLED_AT} --host 127.0.0.1 --port %i --trust-proxy-headers\n" in text


# -- nginx -----------------------------------------------------------------------------------------

def nginx_config(directory: Path, site: str, listen: int) -> Path:
    """A main config that includes `site` (listening on 127.0.0.1:`listen` instead of :80) and
    keeps every file nginx writes under `directory`."""
    directory.mkdir(exist_ok=True)
    assert "    listen 80;\n" in site
    site = site.replace("    listen 80;\n", f"    listen 127.0.0.1:{listen};\n")
    (directory / "site.conf").write_text(site.replace("/var/log/nginx/", f"{directory}/"))
    temp = "\n".join(f"    {kind}_temp_path {directory}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = directory / "nginx.conf"
    main.write_text(f"""{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {directory}/access.log;
{temp}
    include {directory}/site.conf;
}}
""")
    return main


def nginx_command(config: Path) -> list[str]:
    return [tool("nginx"), "-p", str(config.parent), "-e", str(config.parent / "error.log"), "-c", str(config)]


@pytest.mark.parametrize("sample", ["nginx.conf", "nginx-multi.conf"])
def test_the_nginx_samples_load(sample: str, tmp_path: Path) -> None:
    config = nginx_config(tmp_path, (DEPLOY / sample).read_text(), free_port())
    run = subprocess.run([*nginx_command(config), "-t"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "test is successful" in run.stderr


@contextmanager
def nginx(directory: Path, site: str) -> Iterator[int]:
    """A real nginx in front of `site`; yields its port."""
    port = free_port()
    config = nginx_config(directory, site, port)
    proc = subprocess.Popen([*nginx_command(config), "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (directory / "error.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class Reader:
    """One /ask through nginx, read event by event: (id, event, data)."""

    def __init__(self, port: int, query: dict[str, str], instance: str | None = None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        headers = with_instance(instance)
        self.conn.request("GET", "/ask?" + urlencode(query), headers=headers)
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Content-Type") == "text/event-stream"
        cookie = re.search(r"tornado_sse_instance=(\d+)", self.response.getheader("Set-Cookie") or "")
        self.instance = cookie.group(1) if cookie else None  # the instance that answered

    def event(self) -> tuple[str, str, str]:
        return next_frame(self.response)

    def meta(self) -> dict[str, object]:
        _, event, data = self.event()
        assert event == "meta"
        meta: dict[str, object] = json.loads(data)
        return meta

    def close(self) -> None:
        self.conn.close()


def with_instance(instance: str | None) -> dict[str, str]:
    """One client's cookies: its owner id (its conversations and streams are its own), and the
    instance nginx pinned it to, if any."""
    return {"Cookie": OWNER["Cookie"] + (f"; tornado_sse_instance={instance}" if instance else "")}


def test_the_single_instance_sample_streams_every_frame_as_it_comes(tmp_path: Path) -> None:
    tool("nginx")
    with running(*SERVER) as (_, server, _), \
            nginx(tmp_path, (DEPLOY / "nginx.conf").read_text().replace("127.0.0.1:8888", f"127.0.0.1:{server}")) as port:
        reader = Reader(port, {"question": "hi"})
        assert reader.meta()["restarted"] is False
        events: list[tuple[str, str]] = []
        first: float | None = None
        while not events or events[-1] != ("update", "<END_STREAMING_SSE>"):
            _, event, data = reader.event()
            events.append((event, data))
            first = first or time.monotonic()
        reader.close()
        assert first is not None and time.monotonic() - first > 1.0  # not one buffered lump
        assert len(events) > 20 and "hi" in "".join(d for e, d in events if e == "update")
