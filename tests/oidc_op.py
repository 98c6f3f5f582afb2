"""Run a real, independently written OpenID provider (panva's oidc-provider, from npm) for the interop tests."""

import os
import shutil
import subprocess
import time
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


class OidcProvider:
    """oidc-provider on a free port, strictly configured (tests/interop/oidc_provider.mjs), with the app's callback URLs registered."""

    def __init__(self, folder: Path, app_ports: list[int], access_ttl: int = 5):
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "oidc-provider.log"
        self.env = os.environ | {
            "PORT": str(self.port),
            "CLIENT_ID": CLIENT_ID,
            "CLIENT_SECRET": CLIENT_SECRET,
            "REDIRECT_URIS": " ".join(f"http://127.0.0.1:{port}/auth/callback" for port in app_ports),
            "ACCESS_TTL": str(access_ttl),
        }
        self.process: subprocess.Popen | None = None
        self.metadata: dict = {}

    def start(self) -> "OidcProvider":
        if shutil.which("node") is None or shutil.which("npm") is None:
            if os.environ.get("CI"):
                pytest.fail("Node.js and npm are missing, and CI must run the interop tests")
            pytest.skip("Node.js and npm are missing")
        npm_ci()
        with open(self.log_path, "ab") as log:
            command = ["node", "oidc_provider.mjs"]
            self.process = subprocess.Popen(command, cwd=PACKAGE, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.metadata = requests.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2).json()
                return self
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"oidc-provider did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def stats(self) -> dict:
        """Return the provider's own counters: refreshes served, grants revoked, grant errors."""
        return requests.get(f"{self.issuer}/_test/stats", timeout=10).json()

    def introspect(self, token: str) -> dict:
        reply = requests.post(self.metadata["introspection_endpoint"], data={"token": token}, auth=(CLIENT_ID, CLIENT_SECRET), timeout=10)
        reply.raise_for_status()
        return reply.json()


def stored_tokens(database_url: str, name: str) -> dict:
    """Read and decrypt what the app stored for a person, straight from its database."""
    engine = create_engine(database_url)
    cipher = Fernet(TEST_KEY)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT refresh_token, access_token, viewer_token, viewer_scope FROM users WHERE name = :name"), {"name": name}).one()
    finally:
        engine.dispose()
    plain = {key: cipher.decrypt(value.encode()).decode() if value and key != "viewer_scope" else value for key, value in row._mapping.items()}
    return plain
