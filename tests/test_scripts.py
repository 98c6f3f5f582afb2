"""The two README commands for a newcomer: a Python that is too old, a broken .venv and a taken port each explained or mended."""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from browser_server import sign_in
from servers import ROOT, TEST_KEY, free_port, http_sign_in

PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"


def python(minor: str) -> str:
    """Return an interpreter of this version (pyenv's, or on PATH), or skip."""
    found = sorted(PYENV.glob(f"{minor}.*/bin/python")) or [Path(p) for p in [shutil.which(f"python{minor}")] if p]
    if not found:
        pytest.skip(f"no Python {minor} on this machine")
    return str(found[-1])


def demo_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a person who runs the demo: nothing set but what the test must keep out of the repository."""
    # PYTHON and VENV stay: under CI's newest-Python run the demo uses that run's interpreter and .venv.
    own = ("OAUTH_", "APS_", "STANDIN_", "TOKEN_", "DATABASE_URL", "SECRET_KEY", "APP_ENV", "PORT", "HOST")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env |= {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'app.sqlite'}",
        "STANDIN_DATABASE_URL": f"sqlite:///{tmp_path / 'standin.sqlite'}",
        "SECRET_KEY": "demo-test-secret",
        "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
    }
    return env | extra


def start_demo(tmp_path: Path, base: str, **extra: str) -> subprocess.Popen:
    """Start bash scripts/demo as a terminal would run it (a process group of its own) and wait until it answers."""
    with open(tmp_path / "demo.log", "wb") as log:
        env = demo_env(tmp_path, **extra)
        demo = subprocess.Popen(["bash", "scripts/demo"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and demo.poll() is None:
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.3)
    assert demo.poll() is None, (tmp_path / "demo.log").read_text()
    return demo


def test_too_old_python_is_refused_in_one_sentence_that_says_how_to_pick_another(tmp_path):
    old = python("3.10")
    for script in ("demo", "test"):
        done = subprocess.run(
            ["bash", f"scripts/{script}"], cwd=ROOT, env=demo_env(tmp_path, PYTHON=old, PORT=str(free_port())), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "needs Python 3.11 or newer" in lines[0] and "3.10" in lines[0]
        assert f"PYTHON=python3.12 bash scripts/{script}" in lines[0]


def test_a_pyenv_python_not_selected_is_named_by_what_to_do_not_the_same_command(tmp_path):
    """pyenv's shim for a version it has but has not selected does not run: the hint names pyenv and the full path."""
    version = Path(python("3.12")).parent.parent.name
    if not shutil.which("pyenv") or not shutil.which("python3.12"):
        pytest.skip("no pyenv with a python3.12 shim on this machine")
    selected = next((v.name for v in PYENV.iterdir() if v.name.startswith("3.11.")), None)  # anything but 3.12
    if selected is None:
        pytest.skip("no other pyenv Python to select")
    env = demo_env(tmp_path, PYTHON="python3.12", PYENV_VERSION=selected)
    done = subprocess.run(["bash", "scripts/demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    full = PYENV / version / "bin" / "python3.12"
    assert f"pyenv shell {version}" in lines[0] and f"PYTHON={full} bash scripts/demo" in lines[0]
    assert "PYTHON=python3.12 " not in lines[0]  # not the command that just failed
    assert subprocess.run([full, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], env=env).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["made with Python 3.10", "half-built"])
def test_a_broken_venv_is_made_again(tmp_path, broken):
    """A .venv from an older Python, or one whose creation was cut short, is rebuilt instead of failing for ever."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "venv", tmp_path / "scripts" / "venv")
    lock = (ROOT / "requirements.lock").read_text()
    (tmp_path / "small.lock").write_text(re.search(r"^itsdangerous==.*?(?=^\S)", lock, re.S | re.M).group(0))
    if broken == "half-built":
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
    else:
        subprocess.run([python("3.10"), "-m", "venv", "--without-pip", tmp_path / ".venv"], check=True)
    env = {k: v for k, v in demo_env(tmp_path).items() if k not in ("PYTHON", "VENV")}
    done = subprocess.run(["bash", "scripts/venv", "small.lock"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Making .venv again" in done.stderr
    check = "import sys, itsdangerous; assert sys.version_info >= (3, 11)"
    subprocess.run([tmp_path / ".venv" / "bin" / "python", "-c", check], check=True)


def test_taken_port_is_explained_in_one_sentence(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(["bash", "scripts/demo"], cwd=ROOT, env=demo_env(tmp_path, PORT=str(port)), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"Port {port}" in lines[0] and "PORT=8001 bash scripts/demo" in lines[0]


def lan_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as route:
        route.connect(("192.0.2.1", 9))
        return route.getsockname()[0]


@pytest.mark.slow
@pytest.mark.parametrize("host", [None, "0.0.0.0"])  # noqa: S104 (the demo listening beyond the loopback is the point)
def test_demo_on_another_port_signs_in(tmp_path, host):
    """PORT moves the demo, the stand-in's issuer and the callback; HOST=0.0.0.0 lets another machine in through this one's address."""
    port = free_port()
    extra = {"PORT": str(port)} | ({"HOST": host} if host else {})
    base = f"http://{lan_address() if host else 'localhost'}:{port}"
    demo = start_demo(tmp_path, base, **extra)
    try:
        assert f"Demo at {base}" in (tmp_path / "demo.log").read_text()
        browser = http_sign_in(base, "Port Person")
        assert browser.get(f"{base}/api/session", timeout=10).json()["user"]["name"] == "Port Person"
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGTERM)
            demo.wait(timeout=30)


# Ctrl-C within a couple of seconds: a worker stuck in gunicorn's quit handler is killed only after 30 s.
STOP_WITHIN = 6
STOPS = 3  # the stuck worker came in a third to a half of the stops before the fix
# Eight polling loops, as from a few open tabs: each worker starts threads for them as Ctrl-C comes.
BUSY_TABS = """() => { for (let i = 0; i < 8; i++) (function poll() { fetch("/api/lifecycle").then(poll, poll); })(); }"""


@pytest.mark.slow
@pytest.mark.browser
def test_ctrl_c_stops_the_demo_within_seconds_after_a_browser_sign_in(tmp_path, chromium):
    """Ctrl-C signals the terminal's whole process group: the demo stops in seconds, with no worker killed, every time."""
    for attempt in range(STOPS):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        port = free_port()
        base = f"http://localhost:{port}"
        demo = start_demo(folder, base, PORT=str(port))
        context = chromium.new_context()
        try:
            page = context.new_page()
            sign_in(page, base, "Stopping Person", "/session")
            page.locator("#rotations").wait_for()
            # Ctrl-C as requests arrive from a few tabs at once, while the workers start threads for them.
            page.evaluate(BUSY_TABS)
            started = time.monotonic()
            os.killpg(demo.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
            try:
                demo.wait(timeout=60)
            finally:
                took = time.monotonic() - started
        finally:
            context.close()
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()
        log = (folder / "demo.log").read_text()
        assert took < STOP_WITHIN, f"stop {attempt + 1} took {took:.1f} s:\n{log[-2000:]}"
        assert demo.returncode == 0 and "SIGKILL" not in log, log[-2000:]
