"""Production mode refuses unsafe settings with one sentence, and trusts X-Forwarded-* only from its proxies."""

import os
import subprocess
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import request

import config
from app import create_app
from conftest import make_config
from servers import BIN, ROOT, TEST_KEY, free_port

PREFIXES = ("OAUTH_", "APS_", "STANDIN_", "TOKEN_", "DATABASE_URL", "SECRET_KEY", "APP_ENV", "SESSION_COOKIE", "TRUSTED_PROXY", "SIGNIN_")


@pytest.fixture
def production(monkeypatch, tmp_path):
    """A complete production environment against a real provider (APS); tests take pieces away."""
    for name in list(os.environ):
        if name.startswith(PREFIXES):
            monkeypatch.delenv(name)
    values = {
        "APP_ENV": "production",
        "SECRET_KEY": "a-production-secret-of-32-bytes!",
        "TOKEN_ENCRYPTION_KEYS": TEST_KEY,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'app.sqlite'}",
        "OAUTH_PROVIDER": "autodesk",
        "OAUTH_CLIENT_ID": "aps-client",
        "OAUTH_CLIENT_SECRET": "aps-secret",
        "OAUTH_REDIRECT_URI": "https://signin.example/auth/callback",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_production_starts_with_secure_cookies(production):
    app = create_app()
    assert app.config["APP_ENV"] == "production"
    assert app.config["SESSION_COOKIE_SECURE"] is True
    login = app.test_client().get("/auth/login", base_url="https://signin.example")
    cookie = login.headers["Set-Cookie"]
    assert cookie.startswith("__Host-signin=") and "Secure" in cookie and "HttpOnly" in cookie


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        ({"SECRET_KEY": None}, "SECRET_KEY must be set in production."),
        ({"SECRET_KEY": ""}, "SECRET_KEY must be set in production."),
        ({"TOKEN_ENCRYPTION_KEYS": None}, "TOKEN_ENCRYPTION_KEYS must be set in production."),
        ({"TOKEN_ENCRYPTION_KEYS": "not-a-fernet-key"}, "TOKEN_ENCRYPTION_KEYS must hold one or more Fernet keys"),
        ({"OAUTH_PROVIDER": "standin", "OAUTH_CLIENT_ID": None, "OAUTH_CLIENT_SECRET": None}, "OAUTH_PROVIDER=standin is for development only"),
        ({"SESSION_COOKIE_SECURE": "false"}, "SESSION_COOKIE_SECURE must stay on in production."),
        ({"OAUTH_CLIENT_SECRET": None}, "OAUTH_CLIENT_SECRET must be set"),
        ({"TRUSTED_PROXY_COUNT": "one"}, "TRUSTED_PROXY_COUNT must be a whole number"),
        ({"OAUTH_BACKCHANNEL_URL": "standin:8000"}, "OAUTH_BACKCHANNEL_URL must be an absolute http(s) URL"),
        ({"SECRET_KEY": "x" * 31}, "SECRET_KEY must be at least 32 bytes in production"),
        ({"OAUTH_REDIRECT_URI": None}, "OAUTH_REDIRECT_URI must be set in production"),
        ({"OAUTH_REDIRECT_URI": "http://signin.example/auth/callback"}, "OAUTH_REDIRECT_URI must use https in production"),
        ({"OAUTH_ISSUER": "http://developer.api.autodesk.com"}, "OAUTH_ISSUER must use https in production"),
        ({"OAUTH_USERINFO_URL": "http://api.userprofile.autodesk.com/userinfo"}, "OAUTH_USERINFO_URL must use https in production"),
        # deploy/make_env.py's demo lines left in .env beside the APS_* names the checklist asks for.
        ({"OAUTH_CLIENT_ID": "standin-client"}, "OAUTH_CLIENT_ID is the stand-in's 'standin-client'; production needs"),
        ({"OAUTH_CLIENT_SECRET": "standin-secret"}, "OAUTH_CLIENT_SECRET is the stand-in's 'standin-secret'; production needs"),
        ({"APS_CLIENT_ID": "real-aps-client"}, "OAUTH_CLIENT_ID and APS_CLIENT_ID name one setting but differ; set only one of them."),
        ({"APS_CLIENT_SECRET": "real-aps-secret"}, "OAUTH_CLIENT_SECRET and APS_CLIENT_SECRET name one setting but differ"),
        ({"APS_CALLBACK_URL": "https://other.example/auth/callback"}, "OAUTH_REDIRECT_URI and APS_CALLBACK_URL name one setting but differ"),
        # A second authorization at APS would end the first: one refresh token per person per app.
        ({"OAUTH_VIEWER_TOKEN": "authorize"}, "OAUTH_VIEWER_TOKEN=authorize cannot be used with OAUTH_PROVIDER=autodesk"),
        ({"OAUTH_VIEWER_TOKEN": "authorise"}, "OAUTH_VIEWER_TOKEN must be refresh or authorize, got 'authorise'."),
    ],
)
def test_production_refuses_unsafe_settings_with_one_sentence(production, change, sentence):
    for name, value in change.items():
        if value is None:
            production.delenv(name)
        else:
            production.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        create_app()
    message = str(stopped.value)
    assert message.startswith(f"Configuration error: {sentence}")
    assert "\n" not in message


def test_entrypoint_stops_with_the_sentence_not_a_traceback(production, tmp_path):
    """The container's start-up command (migrate, then serve) fails at once with the sentence on stderr."""
    production.delenv("SECRET_KEY")
    env = dict(os.environ) | {"PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["sh", ROOT / "deploy" / "entrypoint.sh"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Configuration error: SECRET_KEY must be set in production." in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "app.sqlite").exists()  # stopped before migrating anything


@pytest.mark.parametrize("missing", ["SECRET_KEY", "TOKEN_ENCRYPTION_KEYS"])
def test_gunicorn_without_secrets_exits_at_once_with_the_sentence(production, missing):
    """gunicorn started by hand (gunicorn.conf.py read from the working directory) stops instead of respawning workers."""
    production.delenv(missing)
    command = [BIN / "gunicorn", "--bind", f"127.0.0.1:{free_port()}", "--workers", "2", "app:create_app()"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"gunicorn kept running for 30 s: {exc.stderr.decode()[-1500:] if exc.stderr else ''}")
    assert done.returncode != 0
    assert done.stderr.count(f"Configuration error: {missing} must be set in production.") == 1, done.stderr
    assert "Booting worker" not in done.stderr
    assert "Traceback" not in done.stderr


def test_the_aps_names_alone_reach_the_provider(production):
    """The checklist's APS_CLIENT_ID / APS_CLIENT_SECRET / APS_CALLBACK_URL are what production sends to Autodesk."""
    for name in ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_REDIRECT_URI"):
        production.delenv(name)
    production.setenv("APS_CLIENT_ID", "real-aps-client")
    production.setenv("APS_CLIENT_SECRET", "real-aps-secret")
    production.setenv("APS_CALLBACK_URL", "https://signin.example/auth/callback")
    production.setenv("OAUTH_CLIENT_SECRET", "real-aps-secret")  # the same value under both names is one setting
    app = create_app()
    authorize = parse_qs(urlsplit(app.test_client().get("/auth/login", base_url="https://signin.example").headers["Location"]).query)
    assert authorize["client_id"] == ["real-aps-client"]
    assert authorize["redirect_uri"] == ["https://signin.example/auth/callback"]
    assert app.extensions["provider"].client_secret == "real-aps-secret"


def test_gunicorn_refuses_a_graceful_stop_shorter_than_a_refresh(production):
    """A stop that kills a worker while a refresh's reply is on its way loses that rotation: refused in production (the demo stops in 3 s)."""
    command = [BIN / "gunicorn", "--bind", f"127.0.0.1:{free_port()}", "--graceful-timeout", "20", "app:create_app()"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "Configuration error: gunicorn's graceful timeout (20 s) must be longer than a refresh may take (50 s:" in done.stderr, done.stderr
    assert "Booting worker" not in done.stderr


@pytest.mark.parametrize(("env", "expected"), [({}, 55), ({"PROVIDER_REFRESH_TIMEOUT": "120"}, 145)])
def test_graceful_stop_follows_the_refresh_timeout_wherever_gunicorn_reads_its_settings(env, expected):
    """The entrypoint, the demo and the tests all read gunicorn.conf.py, so each gets the same graceful timeout."""
    probe = "import runpy; print(runpy.run_path('gunicorn.conf.py')['graceful_timeout'])"
    done = subprocess.run([BIN / "python", "-c", probe], cwd=ROOT, env=dict(os.environ) | env, capture_output=True, text=True, check=True)
    assert int(done.stdout) == expected
    entrypoint = (ROOT / "deploy" / "entrypoint.sh").read_text()
    assert "--graceful-timeout" not in entrypoint and "--config gunicorn.conf.py" in entrypoint


def login_redirect_uri(app, **headers: str) -> str:
    location = app.test_client().get("/auth/login", headers=headers).headers["Location"]
    return parse_qs(urlsplit(location).query)["redirect_uri"][0]


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "signin.example.com", "X-Forwarded-For": "203.0.113.7"}


def test_forwarded_headers_make_the_redirect_uri_https_behind_one_proxy(tmp_path):
    app = create_app(make_config(tmp_path, f"sqlite:///{tmp_path / 'app.sqlite'}", TRUSTED_PROXY_COUNT=1, SESSION_COOKIE_SECURE=True))
    seen = {}

    @app.get("/_remote")
    def remote():
        seen["addr"], seen["scheme"] = request.remote_addr, request.scheme
        return ""

    assert login_redirect_uri(app, **FORWARDED) == "https://signin.example.com/auth/callback"
    app.test_client().get("/_remote", headers=FORWARDED)
    # The client's address, not the proxy's: what the sign-in rate limit counts.
    assert seen == {"addr": "203.0.113.7", "scheme": "https"}


def test_only_the_trusted_proxy_s_own_values_count(tmp_path):
    """A client's forged X-Forwarded-Host comes first; nginx appends (or sets) the real one last."""
    app = create_app(make_config(tmp_path, f"sqlite:///{tmp_path / 'app.sqlite'}", TRUSTED_PROXY_COUNT=1))
    headers = {"X-Forwarded-Proto": "http, https", "X-Forwarded-Host": "evil.example, signin.example.com"}
    assert login_redirect_uri(app, **headers) == "https://signin.example.com/auth/callback"


def test_forwarded_headers_are_ignored_without_a_trusted_proxy(tmp_path):
    app = create_app(make_config(tmp_path, f"sqlite:///{tmp_path / 'app.sqlite'}"))
    assert app.config["TRUSTED_PROXY_COUNT"] == 0
    assert login_redirect_uri(app, **FORWARDED) == "http://localhost/auth/callback"


@pytest.mark.parametrize("value", ["prod", "Production", " production", "production ", "staging", "test", "PRODUCTION"])
def test_app_env_other_than_development_or_production_stops_start_up(production, value):
    """A near miss of production must not start as development, with the stand-in mounted."""
    production.setenv("APP_ENV", value)
    production.setenv("OAUTH_PROVIDER", "standin")
    with pytest.raises(SystemExit) as stopped:
        create_app()
    assert str(stopped.value) == f"Configuration error: APP_ENV must be development or production, got {value!r}."


def test_unset_or_empty_app_env_means_development(production):
    production.setenv("OAUTH_PROVIDER", "standin")
    production.setenv("APP_ENV", "")
    assert create_app().config["APP_ENV"] == "development"
    production.delenv("APP_ENV")
    assert create_app().config["APP_ENV"] == "development"


@pytest.mark.parametrize("uri", ["http://localhost:8000/auth/callback", "http://127.0.0.1:8000/auth/callback", "http://[::1]:8000/auth/callback"])
def test_production_allows_plain_http_only_on_the_loopback(production, uri):
    """Behind a TLS proxy on the same machine, or trying production locally, the loopback carries no traffic off the host."""
    production.setenv("OAUTH_REDIRECT_URI", uri)
    production.setenv("OAUTH_ISSUER", "http://127.0.0.1:9000")
    assert create_app().config["OAUTH_REDIRECT_URI"] == uri


@pytest.mark.parametrize("value", ["production", "prod", "staging", " production"])
def test_standalone_standin_refuses_production(tmp_path, value):
    """standin.wsgi (the compose demo's provider) anyone can sign in to as anyone: never outside development."""
    from standin import wsgi

    environ = {"APP_ENV": value, "STANDIN_ISSUER": "https://signin.example/standin", "STANDIN_DATABASE_URL": f"sqlite:///{tmp_path / 's.sqlite'}"}
    with pytest.raises(SystemExit) as stopped:
        wsgi.create_app(environ)
    assert str(stopped.value).startswith("Configuration error: the stand-in provider is for development only")
    assert not (tmp_path / "s.sqlite").exists()


def test_standalone_standin_runs_in_development(tmp_path):
    from standin import wsgi

    for environ in ({}, {"APP_ENV": "development"}, {"APP_ENV": ""}):
        environ = environ | {"STANDIN_ISSUER": "http://localhost:8080/standin", "STANDIN_DATABASE_URL": f"sqlite:///{tmp_path / 's.sqlite'}"}
        assert wsgi.create_app(environ) is not None


@pytest.mark.slow
def test_flask_run_on_another_port_signs_in_at_the_stand_in_on_that_port(tmp_path):
    """The Flask habit, `flask --app app run --port N`: the embedded stand-in's issuer follows the port."""
    import requests

    from servers import http_sign_in, server_env

    port = free_port()
    env = server_env(tmp_path, f"sqlite:///{tmp_path / 'app.sqlite'}", "unused") | {"PYTHONUNBUFFERED": "1"}
    del env["OAUTH_ISSUER"]  # the default, as after a fresh clone
    subprocess.run([BIN / "flask", "--app", "app", "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True)
    base = f"http://localhost:{port}"
    log = tmp_path / "flask-run.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([BIN / "flask", "--app", "app", "run", "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log.read_text()[-2000:]
            try:
                requests.get(f"{base}/healthz", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        login = requests.get(f"{base}/auth/login", allow_redirects=False, timeout=10)
        assert login.headers["Location"].startswith(f"{base}/standin/authentication/v2/authorize?")
        browser = http_sign_in(base, "Dorothy Vaughan")
        assert browser.get(f"{base}/api/session", timeout=10).json()["user"]["name"] == "Dorothy Vaughan"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("app_env", ["development", "production"])
def test_viewer_authorization_is_refused_wherever_a_second_authorization_ends_the_first(production, app_env, tmp_path):
    """APS, and the stand-in acting as APS, keep one refresh token per person: OAUTH_VIEWER_TOKEN=authorize would cost a sign-in there."""
    production.setenv("APP_ENV", app_env)
    production.setenv("OAUTH_VIEWER_TOKEN", "authorize")
    with pytest.raises(SystemExit, match="APS keeps one refresh token per person per app"):
        create_app()
    for name in ("OAUTH_PROVIDER", "OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "APP_ENV"):
        production.delenv(name)
    production.setenv("STANDIN_DATABASE_URL", f"sqlite:///{tmp_path / 'standin.sqlite'}")
    with pytest.raises(SystemExit, match="OAUTH_VIEWER_TOKEN=authorize needs STANDIN_GRANT_PER_AUTHORIZATION=true"):
        create_app()
    production.setenv("STANDIN_GRANT_PER_AUTHORIZATION", "true")
    assert create_app().config["OAUTH_VIEWER_TOKEN"] == "authorize"
    production.setenv("OAUTH_VIEWER_TOKEN", "refresh")
    production.setenv("OAUTH_PROVIDER", "autodesk")
    production.setenv("APS_CLIENT_ID", "aps-client")
    production.setenv("APS_CLIENT_SECRET", "aps-secret")
    assert create_app().config["OAUTH_VIEWER_TOKEN"] == "refresh"


@pytest.mark.parametrize(
    "issuer",
    [
        "https://developer.api.autodesk.com",
        "https://developer.api.autodesk.com/authentication/v2",
        "https://Developer.API.Autodesk.com./",
        "https://autodesk.com",
        "https://user:pass@signin.autodesk.com:443/oidc",
    ],
)
def test_viewer_authorization_is_refused_for_an_autodesk_issuer_whatever_the_preset(production, issuer):
    """APS read through OAUTH_PROVIDER=oidc still keeps one refresh token per person per app: the host decides, not the preset."""
    production.setenv("OAUTH_PROVIDER", "oidc")
    production.setenv("OAUTH_ISSUER", issuer)
    production.setenv("OAUTH_VIEWER_TOKEN", "authorize")
    with pytest.raises(SystemExit) as stopped:
        create_app()  # refused before discovery: nothing is fetched
    message = str(stopped.value)
    assert message.startswith("Configuration error: OAUTH_VIEWER_TOKEN=authorize cannot be used with an Autodesk issuer")
    assert "APS keeps one refresh token per person per app" in message and "\n" not in message


@pytest.mark.parametrize("issuer", ["https://autodesk.com.evil.example", "https://notautodesk.com", "https://sso.example/autodesk.com"])
def test_viewer_authorization_is_allowed_for_other_oidc_issuers(production, tmp_path, issuer):
    production.setenv("OAUTH_PROVIDER", "oidc")
    production.setenv("OAUTH_ISSUER", issuer)
    production.setenv("OAUTH_VIEWER_TOKEN", "authorize")
    settings = config.load(os.environ, str(tmp_path))
    config.check(settings)
    assert settings["OAUTH_VIEWER_TOKEN"] == "authorize"
