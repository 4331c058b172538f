"""Process-wide start-up (tornado_sse/process.py): the open-files limit, and no import once serving."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import urllib.request
from pathlib import Path

from .test_cli import CLEAN_ENV, running


def open_files_limits(pid: int) -> tuple[int, int]:
    line = next(li for li in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if li.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_soft_open_files_limit_is_raised_to_the_hard_one_and_logged() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    proc = subprocess.Popen([sys.executable, "-m", "tornado_sse", "--port", "0"], env=CLEAN_ENV,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lower)
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        assert open_files_limits(proc.pid) == (hard, hard)
        if low < hard:
            assert any(f"open-files limit raised from {low} to {hard} (the hard limit)" in li
                       for li in lines), lines
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def test_nothing_is_imported_once_the_server_listens_on_any_request_path() -> None:
    """At the open-files limit a lazy import fails ("too many open files") and its stream with it:
    the Responses API's resources, and anyio's on the SDK's retry sleep, are imported at start-up."""
    upstream = subprocess.Popen([sys.executable, "-m", "tornado_sse.demo", "--port", "0",
                                 "--fail", "status", "--status", "500", "--first-token-delay", "0"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert upstream.stdout is not None
        found = re.search(r"(http://\S+/v1)", upstream.stdout.readline())
        assert found is not None
        env = {**CLEAN_ENV, "OPENAI_BASE_URL": found.group(1), "PYTHONPROFILEIMPORTTIME": "1"}
        for api in ("responses", "chat"):
            with running("--api", api, "--max-retries", "1", env=env) as (proc, port, lines):
                listening = len(lines)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ask?question=hi", timeout=20) as r:
                    assert b"event: error" in r.read()  # retried once, then failed
                proc.terminate()
                proc.wait(10)
            # (the import log is on at all: else no late import could show)
            assert any(li.startswith("import time:") for li in lines[:listening])
            late = [li.split("|")[-1].strip() for li in lines[listening:] if li.startswith("import time:")]
            assert late == [], f"--api {api} imported after it listened: {late}"
    finally:
        upstream.kill()
        upstream.wait()
        upstream.stdout.close()  # type: ignore[union-attr]
