"""Read every setting from the environment in one place, and fail fast on bad ones."""

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import click
from cryptography.fernet import Fernet

APS_HOST = "https://developer.api.autodesk.com"

# Scopes a person grants by default; viewables:read must be among them to narrow to it later.
DEFAULT_SCOPES = {
    "standin": "user-profile:read data:read data:write viewables:read",
    "autodesk": "user-profile:read data:read data:write viewables:read",
    "oidc": "openid profile email offline_access",
}

# Data Management paths /api/aps/ forwards to the provider's API host ("*" is one path segment):
# hubs, projects, top folders, folder contents and item versions.
APS_PROXY_PATHS = (
    "project/v1/hubs",
    "project/v1/hubs/*/projects",
    "project/v1/hubs/*/projects/*/topFolders",
    "data/v1/projects/*/folders/*/contents",
    "data/v1/projects/*/items/*/versions",
)

APP_ENVS = ("development", "production")
# The stand-in's own client, which the demo's .env names too: never a real provider's.
STANDIN_CLIENT_ID = "standin-client"
STANDIN_CLIENT_SECRET = "standin-secret"
# A signing key shorter than this is guessable offline from one signed cookie.
MIN_SECRET_KEY_BYTES = 32

LOG_FORMATS = ("text", "json")
# How the browser's viewer gets its narrowed token: a narrowed refresh of the person's grant, or an
# authorization of its own (prompt=none) for just the viewer scope, apart from the person's grant.
VIEWER_TOKEN_MODES = ("refresh", "authorize")

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def load(environ: Mapping[str, str], instance_path: str) -> dict:
    """Build the Flask config mapping from environment variables."""
    env = environ.get
    app_env = env("APP_ENV") or "development"
    # Exact values only: "prod" or "production " must not quietly start as development with the stand-in.
    if app_env not in APP_ENVS:
        raise ConfigError(f"APP_ENV must be development or production, got {app_env!r}.")
    production = app_env == "production"
    provider = env("OAUTH_PROVIDER", "standin").lower()
    if provider not in DEFAULT_SCOPES:
        raise ConfigError("OAUTH_PROVIDER must be one of standin, autodesk, oidc.")

    client_id = env("OAUTH_CLIENT_ID")
    client_secret = env("OAUTH_CLIENT_SECRET")
    redirect_uri = env("OAUTH_REDIRECT_URI")
    if provider == "autodesk":
        client_id = _one_of(environ, "OAUTH_CLIENT_ID", "APS_CLIENT_ID")
        client_secret = _one_of(environ, "OAUTH_CLIENT_SECRET", "APS_CLIENT_SECRET")
        redirect_uri = _one_of(environ, "OAUTH_REDIRECT_URI", "APS_CALLBACK_URL")
    if provider == "standin":
        client_id = client_id or STANDIN_CLIENT_ID
        client_secret = client_secret or STANDIN_CLIENT_SECRET
    if not client_id:
        names = "OAUTH_CLIENT_ID (or APS_CLIENT_ID)" if provider == "autodesk" else "OAUTH_CLIENT_ID"
        raise ConfigError(f"{names} must be set when OAUTH_PROVIDER is {provider}.")

    issuer = env("OAUTH_ISSUER") or {
        "standin": f"http://localhost:{_flask_run_port() or 5000}/standin",
        "autodesk": APS_HOST,
    }.get(provider)
    if provider == "oidc" and not issuer:
        raise ConfigError("OAUTH_ISSUER must be set when OAUTH_PROVIDER is oidc.")
    _check_url("OAUTH_ISSUER", issuer)
    if redirect_uri:
        _check_url("OAUTH_REDIRECT_URI", redirect_uri)
    userinfo_url = _optional_url(environ, "OAUTH_USERINFO_URL")
    revocation_url = _optional_url(environ, "OAUTH_REVOCATION_URL")
    # The API host behind /api/aps/; unset, APS's own (the stand-in serves the same paths under its issuer), none for oidc.
    api_url = _optional_url(environ, "APS_API_URL")
    post_logout_uri = _optional_url(environ, "OAUTH_POST_LOGOUT_REDIRECT_URI")
    backchannel_url = _optional_url(environ, "OAUTH_BACKCHANNEL_URL")

    config = {
        "APP_ENV": "production" if production else "development",
        "SECRET_KEY": env("SECRET_KEY") or (None if production else _kept_secret(instance_path, "secret_key", lambda: secrets.token_hex(32))),
        "SQLALCHEMY_DATABASE_URI": env("DATABASE_URL") or f"sqlite:///{Path(instance_path) / 'app.sqlite'}",
        # Server-side prepared statements on PostgreSQL: only on a direct connection, never behind a
        # transaction-mode pooler (PgBouncer, RDS Proxy), which sends the next execution to another server connection.
        "DATABASE_PREPARED_STATEMENTS": _bool(environ, "DATABASE_PREPARED_STATEMENTS", False),
        "OAUTH_PROVIDER": provider,
        "OAUTH_ISSUER": issuer.rstrip("/"),
        "OAUTH_CLIENT_ID": client_id,
        "OAUTH_CLIENT_SECRET": client_secret,
        "OAUTH_SCOPES": env("OAUTH_SCOPES") or DEFAULT_SCOPES[provider],
        "OAUTH_VIEWER_SCOPE": env("OAUTH_VIEWER_SCOPE", "viewables:read"),
        "OAUTH_VIEWER_TOKEN": _viewer_token_mode(env("OAUTH_VIEWER_TOKEN") or "refresh"),
        "OAUTH_REDIRECT_URI": redirect_uri,
        "OAUTH_USERINFO_URL": userinfo_url,
        # For a provider whose discovery documents name no revocation endpoint (sign-out then cannot revoke).
        "OAUTH_REVOCATION_URL": revocation_url,
        # Where this server reaches the provider when OAUTH_ISSUER is only the browser's address (Docker).
        "OAUTH_BACKCHANNEL_URL": backchannel_url.rstrip("/") if backchannel_url else None,
        "TOKEN_REFRESH_LEEWAY": _int(environ, "TOKEN_REFRESH_LEEWAY", 60),
        # Seconds before the leeway when a request still gets the valid token and a refresh starts after its response.
        "TOKEN_REFRESH_AHEAD": _int(environ, "TOKEN_REFRESH_AHEAD", 300),
        "PROVIDER_TIMEOUT": _int(environ, "PROVIDER_TIMEOUT", 10),
        # A refresh whose reply times out may have rotated the token: wait longer for it than for other calls.
        "PROVIDER_REFRESH_TIMEOUT": _int(environ, "PROVIDER_REFRESH_TIMEOUT", 30),
        # Seconds to keep retrying the commit of a rotated refresh token before it counts as lost.
        "ROTATION_STORE_RETRY": _int(environ, "ROTATION_STORE_RETRY", 10),
        # When a grant has died, try the provider's authorize with prompt=none once before showing a sign-in form.
        "SILENT_SIGN_IN": _bool(environ, "SILENT_SIGN_IN", True),
        "SESSION_COOKIE_SECURE": _bool(environ, "SESSION_COOKIE_SECURE", True),
        # Reverse proxies in front of the app whose X-Forwarded-For/-Proto/-Host are believed; 0 believes none.
        "TRUSTED_PROXY_COUNT": _int(environ, "TRUSTED_PROXY_COUNT", 0),
        "TOKEN_ENCRYPTION_KEYS": env("TOKEN_ENCRYPTION_KEYS")
        or (None if production else _kept_secret(instance_path, "token_keys", lambda: Fernet.generate_key().decode())),
        "STANDIN_DATABASE_URL": env("STANDIN_DATABASE_URL") or f"sqlite:///{Path(instance_path) / 'standin.sqlite'}",
        "STANDIN_ACCESS_TOKEN_TTL": _int(environ, "STANDIN_ACCESS_TOKEN_TTL", 3599),
        "STANDIN_STRICT": _bool(environ, "STANDIN_STRICT", False),
        # Two habits of real providers, to test the app against: see the README's provider table.
        "STANDIN_NARROWS_QUIETLY": _bool(environ, "STANDIN_NARROWS_QUIETLY", False),
        "STANDIN_INTROSPECTS_ACCESS_ONLY": _bool(environ, "STANDIN_INTROSPECTS_ACCESS_ONLY", False),
        # The stand-in makes every authorization a grant of its own, as OpenID providers do, instead of APS's one per person per app.
        "STANDIN_GRANT_PER_AUTHORIZATION": _bool(environ, "STANDIN_GRANT_PER_AUTHORIZATION", False),
        "SIGNIN_RATE_LIMIT": env("SIGNIN_RATE_LIMIT", "20/minute"),
        # Back-channel logout requests per address and worker (OAUTH_PROVIDER=oidc); "off" disables the limit.
        "BACKCHANNEL_LOGOUT_RATE_LIMIT": env("BACKCHANNEL_LOGOUT_RATE_LIMIT", "60/minute"),
        # After a sign-out here, also end the person's session at the provider (its end-session endpoint).
        "OAUTH_LOGOUT_AT_PROVIDER": _bool(environ, "OAUTH_LOGOUT_AT_PROVIDER", False),
        # Where the provider sends the browser back after that; unset, this app's home (not for APS, which
        # redirects only to URIs Autodesk approved).
        "OAUTH_POST_LOGOUT_REDIRECT_URI": post_logout_uri,
        "APS_API_URL": api_url.rstrip("/") if api_url else None,
        "APS_PROXY_PATHS": _paths(environ.get("APS_PROXY_PATHS")),
        # An API answer must come whole within this many seconds and bytes, or the proxy answers 504 / 502.
        "APS_PROXY_TIMEOUT": _int(environ, "APS_PROXY_TIMEOUT", 10),
        "APS_PROXY_MAX_BYTES": _int(environ, "APS_PROXY_MAX_BYTES", 2 * 1024 * 1024),
        # Who may read GET /metrics besides the loopback: networks such as the compose network's.
        "METRICS_ALLOW": _networks(environ, "METRICS_ALLOW"),
        "LOG_FORMAT": log_format(environ),
    }
    return config


def check(config: Mapping) -> None:
    """Refuse a configuration that must not run, production rules included."""
    if not config.get("SECRET_KEY"):
        raise ConfigError("SECRET_KEY must be set in production.")
    if not config.get("TOKEN_ENCRYPTION_KEYS"):
        raise ConfigError("TOKEN_ENCRYPTION_KEYS must be set in production.")
    if config["OAUTH_PROVIDER"] != "standin" and not config.get("OAUTH_CLIENT_SECRET"):
        raise ConfigError("OAUTH_CLIENT_SECRET must be set for a confidential client.")
    if config.get("OAUTH_VIEWER_TOKEN") == "authorize":
        _check_viewer_authorization(config)
    if config["APP_ENV"] == "production":
        _check_production(config)


def _check_viewer_authorization(config: Mapping) -> None:
    """Refuse a second authorization for the viewer where it would end the person's sign-in: APS, and the stand-in acting as APS."""
    if config["OAUTH_PROVIDER"] == "autodesk":
        raise ConfigError(
            "OAUTH_VIEWER_TOKEN=authorize cannot be used with OAUTH_PROVIDER=autodesk: APS keeps one refresh token per person per app, "
            "so a second authorization would end the person's sign-in; use OAUTH_VIEWER_TOKEN=refresh."
        )
    # The oidc preset reads APS's discovery document too: what counts is whose server it is.
    if _autodesk_host(config["OAUTH_ISSUER"]):
        raise ConfigError(
            f"OAUTH_VIEWER_TOKEN=authorize cannot be used with an Autodesk issuer (OAUTH_ISSUER={config['OAUTH_ISSUER']}): APS keeps one "
            "refresh token per person per app, so a second authorization would end the person's sign-in; use OAUTH_VIEWER_TOKEN=refresh."
        )
    if config["OAUTH_PROVIDER"] == "standin" and not config.get("STANDIN_GRANT_PER_AUTHORIZATION"):
        raise ConfigError(
            "OAUTH_VIEWER_TOKEN=authorize needs STANDIN_GRANT_PER_AUTHORIZATION=true: otherwise the stand-in keeps one refresh token "
            "per person, as APS does, and a second authorization would end the person's sign-in."
        )


def _autodesk_host(url: str) -> bool:
    """Tell whether a URL's host is autodesk.com or one of its subdomains."""
    host = (urlsplit(url).hostname or "").rstrip(".")
    return host == "autodesk.com" or host.endswith(".autodesk.com")


def _check_production(config: Mapping) -> None:
    """Refuse what development allows: the stand-in, its client, insecure cookies, a short secret, plain http."""
    if config["OAUTH_PROVIDER"] == "standin":
        raise ConfigError("OAUTH_PROVIDER=standin is for development only; set APP_ENV=development or a real provider.")
    for name, value in (("OAUTH_CLIENT_ID", STANDIN_CLIENT_ID), ("OAUTH_CLIENT_SECRET", STANDIN_CLIENT_SECRET)):
        if config.get(name) == value:
            raise ConfigError(f"{name} is the stand-in's {value!r}; production needs the one your provider issued (remove the demo's line from .env).")
    if not config["SESSION_COOKIE_SECURE"]:
        raise ConfigError("SESSION_COOKIE_SECURE must stay on in production.")
    if len(config["SECRET_KEY"].encode()) < MIN_SECRET_KEY_BYTES:
        raise ConfigError(f"SECRET_KEY must be at least {MIN_SECRET_KEY_BYTES} bytes in production (secrets.token_hex(32) makes one).")
    if not config.get("OAUTH_REDIRECT_URI"):
        # Otherwise it is built from the Host header, which the client chooses.
        raise ConfigError("OAUTH_REDIRECT_URI must be set in production (the https://.../auth/callback registered with the provider).")
    # Codes, tokens and the client secret travel to and from these: only over TLS, or within this machine.
    for name in ("OAUTH_ISSUER", "OAUTH_REDIRECT_URI", "OAUTH_USERINFO_URL", "APS_API_URL", "OAUTH_POST_LOGOUT_REDIRECT_URI"):
        if config.get(name) and not _https_or_loopback(config[name]):
            raise ConfigError(f"{name} must use https in production (plain http only on the loopback), got {config[name]!r}.")


def _kept_secret(instance_path: str, name: str, make) -> str:
    """Return a development secret kept in the instance folder, creating it once, readable by its owner only."""
    path = Path(instance_path) / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Created 0600, never readable by others even for a moment (a write then a chmod would be).
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
                file.write(make())
        except FileExistsError:
            pass  # another worker created it first: use theirs
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # left readable by an older version or a copy
    return path.read_text().strip()


def _one_of(environ: Mapping[str, str], name: str, alias: str) -> str | None:
    """Read a setting that has two names; refuse both set to different values (which one wins is a guess)."""
    value, other = environ.get(name), environ.get(alias)
    if value and other and value != other:
        raise ConfigError(f"{name} and {alias} name one setting but differ; set only one of them.")
    return value or other or None


def _flask_run_port() -> int | None:
    """The port `flask --app app run --port N` serves on, so the embedded stand-in's issuer follows it."""
    context = click.get_current_context(silent=True)
    if context is None or context.info_name != "run":
        return None
    return context.params.get("port")


def _https_or_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _optional_url(environ: Mapping[str, str], name: str) -> str | None:
    """Read a URL setting that may be unset, as given; refuse one set to anything but an absolute http(s) URL."""
    value = environ.get(name)
    if value:
        _check_url(name, value)
    return value


def _check_url(name: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an absolute http(s) URL, got {value!r}.")


def _paths(raw: str | None) -> tuple[str, ...]:
    """Read APS_PROXY_PATHS: path templates separated by spaces or commas, literal segments or "*"."""
    if raw is None or not raw.strip():
        return APS_PROXY_PATHS
    templates = tuple(raw.replace(",", " ").split())
    for template in templates:
        if not all(seg == "*" or re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", seg) for seg in template.strip("/").split("/")):
            raise ConfigError(f"APS_PROXY_PATHS holds path templates such as data/v1/projects/*/folders/*/contents, got {template!r}.")
    return tuple(t.strip("/") for t in templates)


def _viewer_token_mode(value: str) -> str:
    if value not in VIEWER_TOKEN_MODES:
        raise ConfigError(f"OAUTH_VIEWER_TOKEN must be refresh or authorize, got {value!r}.")
    return value


def log_format(environ: Mapping[str, str]) -> str:
    """Read LOG_FORMAT: text for a person at a terminal (development's default), json for a log pipeline (production's)."""
    default = "json" if environ.get("APP_ENV") == "production" else "text"
    value = environ.get("LOG_FORMAT") or default
    if value not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT must be text or json, got {value!r}.")
    return value


def _networks(environ: Mapping[str, str], name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Read networks (CIDRs such as 172.16.0.0/12, or single addresses) separated by spaces or commas."""
    raw = environ.get(name) or ""
    try:
        return tuple(ipaddress.ip_network(part) for part in raw.replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"{name} holds networks such as 10.0.0.0/8 or 172.18.0.0/16, separated by spaces, got {raw!r}.") from None


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number of seconds, got {raw!r}.") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}.")
    return value


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}.")
