"""Run real, independently written OpenID providers for the interop tests: panva's oidc-provider (npm) and django-oauth-toolkit (PyPI)."""

import hashlib
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from servers import ROOT, TEST_KEY, free_port

PACKAGE = ROOT / "tests" / "interop"
CLIENT_ID, CLIENT_SECRET = "interop-client", "interop-secret"


def npm_ci() -> None:
    """Install the pinned provider from package-lock.json, unless that exact tree is already installed."""
    lock = PACKAGE / "package-lock.json"
    installed = PACKAGE / "node_modules" / ".package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime and (PACKAGE / "node_modules" / "oidc-provider").is_dir():
        return
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PACKAGE, check=True, capture_output=True, timeout=300)


class Provider:
    """A provider in its own process on a free port, with the app's callback URLs registered; the subclasses say how to run it and read it."""

    name = ""
    command: list[str] = []

    def __init__(self, folder: Path, app_ports: list[int], access_ttl: int = 5):
        self.port = free_port()
        self.folder = folder
        self.log_path = folder / f"{self.name}.log"
        self.env = os.environ | {
            "PORT": str(self.port),
            "DATA_DIR": str(folder),
            "CLIENT_ID": CLIENT_ID,
            "CLIENT_SECRET": CLIENT_SECRET,
            "REDIRECT_URIS": " ".join(f"http://127.0.0.1:{port}/auth/callback" for port in app_ports),
            "ACCESS_TTL": str(access_ttl),
        }
        self.process: subprocess.Popen | None = None
        self.metadata: dict = {}

    def install(self) -> None:
        raise NotImplementedError

    def start(self) -> "Provider":
        self.install()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=PACKAGE, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.metadata = requests.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2).json()
                return self
            except (requests.RequestException, ValueError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def introspect(self, token: str) -> dict:
        reply = requests.post(self.metadata_any("introspection_endpoint"), data={"token": token}, auth=(CLIENT_ID, CLIENT_SECRET), timeout=10)
        reply.raise_for_status()
        return reply.json()

    def metadata_any(self, key: str) -> str:
        """Return an endpoint from the OIDC discovery document, or else from the RFC 8414 one."""
        if key in self.metadata:
            return self.metadata[key]
        return requests.get(f"{self.issuer}/.well-known/oauth-authorization-server", timeout=10).json()[key]


class OidcProvider(Provider):
    """panva's oidc-provider, strictly configured by tests/interop/oidc_provider.mjs."""

    name = "oidc-provider"
    command = ["node", "oidc_provider.mjs"]

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def install(self) -> None:
        if shutil.which("node") is None or shutil.which("npm") is None:
            if os.environ.get("CI"):
                pytest.fail("Node.js and npm are missing, and CI must run the interop tests")
            pytest.skip("Node.js and npm are missing")
        npm_ci()

    def sign_in(self, page, login: str) -> None:
        page.locator('input[name="login"]').fill(login)
        page.locator('input[name="password"]').fill("any password")
        page.get_by_role("button", name="Sign-in").click()
        page.get_by_role("button", name="Continue").click()  # consent, asked because of offline_access

    def stats(self) -> dict:
        return requests.get(f"{self.issuer}/_test/stats", timeout=10).json()

    def refreshes(self) -> int:
        return self.stats()["refresh"]

    def grants_revoked_on_reuse(self) -> int:
        return self.stats()["grant_errors"].get("invalid_grant: refresh token already used", 0)

    def refresh_token_live(self, token: str) -> bool:
        return self.introspect(token)["active"]

    def refresh_token_scope(self, token: str) -> set[str]:
        return set(self.introspect(token)["scope"].split())

    def access_token_live(self, token: str) -> bool:
        return self.introspect(token)["active"]


class DjangoOAuthToolkit(Provider):
    """django-oauth-toolkit in a Django project of its own (tests/interop/dot_provider.py), strictly configured."""

    name = "django-oauth-toolkit"
    command = [str(PACKAGE / ".venv" / "bin" / "python"), "dot_provider.py"]

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}/o"

    def install(self) -> None:
        pip_install()

    def sign_in(self, page, login: str) -> None:
        page.locator('input[name="username"]').fill(login)  # Django's own login page
        page.locator('input[name="password"]').fill("any password")
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("button", name="Authorize").click()  # the toolkit's consent page

    def stats(self) -> dict:
        return requests.get(f"http://127.0.0.1:{self.port}/_test/stats", timeout=10).json()

    def refreshes(self) -> int:
        return sum(count for outcome, count in self.stats().items() if outcome.endswith(" 200 ok"))

    def grants_revoked_on_reuse(self) -> int:
        return sum(count for outcome, count in self.stats().items() if "invalid_grant" in outcome)

    def refresh_token(self, token: str) -> dict:
        return requests.get(f"http://127.0.0.1:{self.port}/_test/refresh-token", params={"token": token}, timeout=10).json()

    def refresh_token_live(self, token: str) -> bool:
        return self.refresh_token(token)["live"]

    def refresh_token_scope(self, token: str) -> set[str]:
        return set(self.refresh_token(token)["scope"].split())

    def access_token_live(self, token: str) -> bool:
        return self.introspect(token)["active"]


def pip_install() -> None:
    """Install the locked toolkit into tests/interop/.venv, unless that exact lock is already installed."""
    venv, wanted = PACKAGE / ".venv", PACKAGE / "requirements.lock"
    stamp = venv / "installed-requirements.sha256"
    digest = hashlib.sha256(wanted.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "--require-hashes", "-r", str(wanted)]
    subprocess.run(pip, check=True, capture_output=True, timeout=600)
    stamp.write_text(digest)


def stored_tokens(database_url: str, name: str) -> dict:
    """Read and decrypt what the app stored for a person, straight from its database."""
    engine = create_engine(database_url)
    cipher = Fernet(TEST_KEY)
    try:
        with engine.connect() as conn:
            query = text(
                "SELECT refresh_token, access_token, viewer_token, viewer_refresh_token, viewer_scope, access_expires_at FROM users WHERE name = :name"
            )
            row = conn.execute(query, {"name": name}).one()._mapping
    finally:
        engine.dispose()
    encrypted = ("refresh_token", "access_token", "viewer_token", "viewer_refresh_token")
    tokens = {key: cipher.decrypt(row[key].encode()).decode() if row[key] else None for key in encrypted}
    expires = row["access_expires_at"]
    if isinstance(expires, str):  # SQLite keeps it as text
        expires = datetime.fromisoformat(expires)
    return tokens | {"viewer_scope": row["viewer_scope"], "access_expires_at": expires.replace(tzinfo=expires.tzinfo or UTC)}
