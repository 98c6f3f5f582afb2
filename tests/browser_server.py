"""Serve the real app under gunicorn on a free port, and drive Debian's Chromium against it.

Used by tests/test_browser.py and by scripts/screenshots.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1100, "height": 800}
TEST_KEY = "8dPAA3qIkpHyELgsyIDmxI0ZBvP5jsC5Ys2yLAOFb3g="
# A 65 s access token with the default 60 s leeway: the first silent refresh is due 5 s after sign-in.
ACCESS_TTL = 65
LEEWAY = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """The app with its embedded stand-in, under gunicorn, on its own databases in a folder."""

    def __init__(self, folder: Path, **settings: str):
        self.folder = Path(folder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.folder / "gunicorn.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("OAUTH_", "APS_", "STANDIN_", "TOKEN_", "DATABASE_URL", "SECRET_KEY", "APP_ENV"))}
        self.env.update(
            {
                "APP_ENV": "development",
                "SECRET_KEY": "browser-test-secret",
                "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
                "DATABASE_URL": f"sqlite:///{self.folder / 'app.sqlite'}",
                "STANDIN_DATABASE_URL": f"sqlite:///{self.folder / 'standin.sqlite'}",
                "OAUTH_ISSUER": f"{self.url}/standin",
                "SESSION_COOKIE_SECURE": "false",
                "STANDIN_STRICT": "true",
                "STANDIN_ACCESS_TOKEN_TTL": str(ACCESS_TTL),
                "TOKEN_REFRESH_LEEWAY": str(LEEWAY),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update(settings)
        self.process: subprocess.Popen | None = None

    def start(self) -> "LiveServer":
        """Apply the migrations, start gunicorn and wait until it answers /healthz."""
        self.folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([BIN / "flask", "--app", "app", "db", "upgrade"], cwd=ROOT, env=self.env, check=True, capture_output=True)
        # No control socket: its default path is shared, and other instances may run on this machine.
        args = ["--no-control-socket", "--bind", f"127.0.0.1:{self.port}", "--workers", "2", "--threads", "4", "--timeout", "60"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [BIN / "gunicorn", *args, "app:create_app()"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gunicorn did not become healthy: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop gunicorn and its workers (its own process group, started above)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def playwright_session() -> Iterator:
    """Run Playwright, and on the way out wait until its driver process has really exited.

    Playwright may return while its driver is still exiting; the driver's Popen object would then be
    collected while the process runs, which warns (an error under pytest's filterwarnings=error).
    """
    from playwright.sync_api import sync_playwright

    manager = sync_playwright()
    with manager as playwright:
        try:
            driver = manager._client._transport._proc._transport._proc  # Playwright internals; absent in other versions
        except AttributeError:
            driver = None
        yield playwright
    if driver is not None:
        driver.wait(timeout=30)


def launch_chromium(playwright):
    """Start Debian's Chromium headless (Playwright's own browser download is not used)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def sign_in(page, base_url: str, name: str, next_path: str = "/") -> None:
    """Sign in through the stand-in's page as a person would: open the app, type a name, click Sign in."""
    page.goto(f"{base_url}/auth/login?next={next_path}")
    page.get_by_label("Your name").fill(name)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(f"{base_url}{next_path}")
