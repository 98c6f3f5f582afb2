"""Run the real app under gunicorn in its own processes, and sign a person in over real HTTP."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import requests
from sqlalchemy import NullPool, create_engine, update

from models import User, utcnow
from standin.store import Store

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEST_KEY = "8dPAA3qIkpHyELgsyIDmxI0ZBvP5jsC5Ys2yLAOFb3g="


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(tmp_path: Path, database_url: str, issuer: str, **extra: str) -> dict:
    """Return the environment an app process gets: like a deployment, everything by variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OAUTH_", "APS_", "STANDIN_", "TOKEN_", "DATABASE_URL", "SECRET_KEY", "APP_ENV"))}
    env.update(
        {
            "APP_ENV": "development",
            "SECRET_KEY": "process-test-secret",
            "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
            "DATABASE_URL": database_url,
            "STANDIN_DATABASE_URL": f"sqlite:///{tmp_path / 'standin.sqlite'}",
            "OAUTH_ISSUER": issuer,
            "SESSION_COOKIE_SECURE": "false",
            "STANDIN_STRICT": "true",
            # Short-lived test tokens would otherwise be refreshed ahead between a test's counts; test_refresh_ahead turns it on.
            "TOKEN_REFRESH_AHEAD": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def instances(tmp_path: Path, database_url: str, **extra: str) -> Iterator[Callable[..., "Gunicorn"]]:
    """Start app instances on one database, all sharing the stand-in embedded in the first (whose port the issuer names).

    Yield start(port=None, workers=3, **env) -> Gunicorn, with .store, the stand-in's store; every instance is killed at the end.
    """
    started: list[Gunicorn] = []
    issuer_port = free_port()
    env = server_env(tmp_path, database_url, f"http://127.0.0.1:{issuer_port}/standin", **extra)

    def start(port: int | None = None, workers: int = 3, **more: str) -> Gunicorn:
        port = port or (issuer_port if not started else free_port())
        server = Gunicorn(env | more, port, tmp_path / f"gunicorn-{port}.log", workers=workers).start()
        started.append(server)
        return server

    start.store = Store(env["STANDIN_DATABASE_URL"])
    try:
        yield start
    finally:
        for server in started:
            server.kill()


def expire_access_token_in(database_url: str, seconds: int, lifetime: int | None = None) -> None:
    """Move the stored access token's expiry to seconds from now; given its lifetime, as if it had been issued that long before."""
    expires = utcnow() + timedelta(seconds=seconds)
    issued = {"signed_in_at": expires - timedelta(seconds=lifetime)} if lifetime is not None else {}
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(update(User).values(access_expires_at=expires, **issued))
    finally:
        engine.dispose()


def migrate(env: dict) -> None:
    subprocess.run([BIN / "flask", "--app", "app", "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True)


class Gunicorn:
    """One app instance: a gunicorn master with its workers, in its own process group."""

    def __init__(self, env: dict, port: int, log_path: Path, workers: int = 3, threads: int = 4, target: str = "app:create_app()"):
        self.env, self.port, self.log_path, self.target = env, port, log_path, target
        # gunicorn.conf.py: the image's access-log format and forwarded-header policy.
        self.args = ["--config", "gunicorn.conf.py", "--no-control-socket", "--bind", f"127.0.0.1:{port}"]
        self.args += ["--workers", str(workers), "--threads", str(threads), "--timeout", "60"]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Gunicorn":
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [BIN / "gunicorn", *self.args, self.target], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass  # not listening yet, or workers still booting
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn did not become healthy: {self.log_path.read_text()[-2000:]}")

    def workers(self) -> list[int]:
        """Return the pids of the master's live worker processes."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), as a deploy does: what is in flight finishes first."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Stop at once (SIGKILL to the master and its workers), at a test's end where nothing waits on a graceful stop.

        A graceful stop keeps each kept-alive client connection open for up to 2 s, in case a request is on its way.
        """
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def http_sign_in(base_url: str, name: str = "Ada Lovelace") -> requests.Session:
    """Sign a person in through the stand-in's page over real HTTP; return their browser-like session."""
    browser = requests.Session()
    login = browser.get(f"{base_url}/auth/login", allow_redirects=False, timeout=30)
    authorize = login.headers["Location"]
    assert browser.get(authorize, timeout=30).status_code == 200
    consent = browser.post(authorize, data={"name": name}, allow_redirects=False, timeout=30)
    callback = consent.headers["Location"]
    done = browser.get(callback, allow_redirects=False, timeout=30)
    assert done.status_code == 302, done.text
    assert urlsplit(done.headers["Location"]).path == "/"
    return browser


def burst(browser: requests.Session, urls: list[str], count: int = 50) -> list[int | str]:
    """Send count concurrent requests carrying the person's cookie, spread over urls; return the statuses."""
    cookies = browser.cookies.get_dict()
    statuses: list[int | str] = []
    barrier = threading.Barrier(count)

    def call(url: str) -> None:
        barrier.wait()
        try:
            statuses.append(requests.get(url, cookies=cookies, timeout=60).status_code)
        except requests.RequestException as exc:
            statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=call, args=(urls[i % len(urls)],)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses
