"""The Dockerfile built with buildah and its entrypoint run, on a local stand-in for the registry base image.

Slow the first time on a machine (the base, then every layer, about 3 minutes); after that buildah's
layer cache leaves the build only the layers after `COPY . .`.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import fresh_postgres_database
from servers import TEST_KEY, free_port, http_sign_in
from test_deploy import image_healthcheck

pytestmark = pytest.mark.slow

TAG = "localhost/signin-app:test"


@pytest.fixture(scope="module")
def image():
    """Build the image from this checkout; yield buildah's command and the image's configuration."""
    if not all(shutil.which(tool) for tool in ("buildah", "debootstrap")) or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the image test needs buildah and debootstrap (.ci/run installs them) and root (CI runs as root)")
        pytest.skip("the image test needs buildah, debootstrap and root")
    import image as builder

    builder.ensure_base()
    done = builder.build(TAG)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    inspected = subprocess.run([*builder.BUILDAH, "inspect", "--type", "image", TAG], capture_output=True, text=True, check=True)
    yield builder, json.loads(inspected.stdout)["OCIv1"]["config"]


@pytest.fixture
def container(image):
    """A working container of the image, its root file system mounted here; removed afterwards."""
    builder, _config = image
    name = subprocess.run([*builder.BUILDAH, "from", TAG], capture_output=True, text=True, check=True).stdout.strip()
    root = Path(subprocess.run([*builder.BUILDAH, "mount", name], capture_output=True, text=True, check=True).stdout.strip())
    yield name, root
    subprocess.run([*builder.BUILDAH, "rm", name], capture_output=True)


def test_image_holds_the_app_and_nothing_of_the_developer_s(container):
    _name, root = container
    app = root / "app"
    assert (app / "app.py").exists() and (app / "migrations").is_dir() and (app / "deploy" / "entrypoint.sh").exists()
    for never in (".git", "tests", ".venv", ".venv-newest", ".env", "bench", "test-output", "node_modules"):
        assert not (app / never).exists(), never
    assert list((app / "instance").iterdir()) == []  # no development secret or SQLite file came along
    assert not list(app.rglob("*.sqlite")) and not list(app.rglob(".env"))


def gunicorn_master(port: int) -> int:
    """The pid of the gunicorn master serving on port (started inside the container's chroot)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            parts = cmdline.read_bytes().split(b"\0")
            parent = int((cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        is_gunicorn = any(part.endswith(b"gunicorn") for part in parts[:2])
        if is_gunicorn and f"127.0.0.1:{port}".encode() in parts and b"gunicorn" not in Path(f"/proc/{parent}/cmdline").read_bytes():
            return int(cmdline.parent.name)
    raise AssertionError(f"no gunicorn master on port {port}")


def test_entrypoint_migrates_postgresql_serves_and_signs_in_as_uid_10001(image, container, tmp_path):
    """The image's own ENTRYPOINT, as buildah runs it, against CI's PostgreSQL: ready, signed in, never root."""
    builder, config = image
    name, _root = container
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with fresh_postgres_database("signin_image") as database_url:
        env = {
            "APP_ENV": "development",  # the embedded stand-in inside the image is the provider
            "DATABASE_URL": database_url,
            "SECRET_KEY": "image-test-secret",
            "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
            "OAUTH_ISSUER": f"{base}/standin",
            "SESSION_COOKIE_SECURE": "false",
            "STANDIN_DATABASE_URL": "sqlite:////data/standin.sqlite",
            # The host's network: only the loopback, on a port of this test's.
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "PORT": str(port),
        }
        command = [*builder.BUILDAH, "run", *builder.ISOLATION, *(f"--env={k}={v}" for k, v in env.items()), name, "--", *config["Entrypoint"]]
        log = tmp_path / "container.log"
        with open(log, "wb") as out:
            running = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert running.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                try:
                    if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.3)
            assert requests.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
            assert requests.get(f"{base}/readyz", timeout=10).json() == {"status": "ready"}

            master = gunicorn_master(port)
            for pid in [master, *map(int, Path(f"/proc/{master}/task/{master}/children").read_text().split())]:
                uid = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
                assert uid.split()[1:] == ["10001"] * 4, uid

            browser = http_sign_in(base, "Grace Hopper")
            session = browser.get(f"{base}/api/session", timeout=30).json()
            assert session["signed_in"] is True and session["user"]["name"] == "Grace Hopper"

            health = image_healthcheck()  # the Dockerfile's HEALTHCHECK, run inside the container
            probe = subprocess.run([*builder.BUILDAH, "run", *builder.ISOLATION, f"--env=PORT={port}", name, "--", *health], capture_output=True, timeout=60)
            assert probe.returncode == 0, probe.stderr
        finally:
            if running.poll() is None:
                os.kill(gunicorn_master(port), signal.SIGTERM)
            code = running.wait(timeout=90)
    text = log.read_text()
    assert "Running upgrade" in text  # migrated before serving
    assert code == 0, text[-3000:]
