"""Installed, not just checked out: a built wheel in a fresh venv serves the page from elsewhere."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

from .test_cli import running

ROOT = Path(__file__).resolve().parent.parent


def test_the_types_check() -> None:
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_wheel_installed_in_a_fresh_venv_serves_the_page_and_its_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("tornado_sse-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # The dependencies come from the environment running this test, venv or not: its site-packages
    # go on the new venv's path after its own, so the package itself comes from the wheel. (A path
    # line in a .pth file is only appended; the .pth files inside it, such as the checkout's
    # editable finder, are not run.)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    Path(purelib, "outer-environment.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    located = subprocess.run([python, "-c", "import tornado_sse; print(tornado_sse.__file__)"],
                             cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert str(venv) in located  # the installed copy, not the checkout
    with running(python=python, cwd=str(elsewhere)) as (_, port, _lines):
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert 'id="form-question"' in page
        for name in ("app.js", "style.css", "favicon.svg"):
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/static/{name}", timeout=10).status == 200


def test_every_requirement_is_pinned_in_the_constraints() -> None:
    """The README's commands install with `-c constraints.txt`: a dependency added to setup.cfg
    without a pin would float to whatever is newest on the next fresh machine."""
    import configparser
    import re

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    wanted = config["options"]["install_requires"].split() + config["options.extras_require"]["test"].split()
    names = {re.split(r"[<>=!~\[;]", line, maxsplit=1)[0] for line in wanted if line[0].isalpha()}
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    missing = {n for n in names if re.sub(r"[-_.]+", "-", n).lower() not in pins}
    assert not missing, f"not pinned in constraints.txt (run bash .ci/refresh-pins): {sorted(missing)}"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pins.values()), "every pin is an exact =="
