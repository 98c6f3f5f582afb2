"""Serve the stand-in provider on its own, configured from the environment (the Docker demo's standin service).

    STANDIN_ISSUER=http://localhost:8080/standin gunicorn 'standin.wsgi:create_app()'

The issuer is the address browsers use; the provider answers under its path, so a reverse proxy can
route that path here unchanged, and the app reaches it server-to-server through OAUTH_BACKCHANNEL_URL.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import standin
from config import TRUE


def create_app(environ: Mapping[str, str] = os.environ) -> DispatcherMiddleware:
    """Create the stand-in from STANDIN_* variables, mounted at its issuer's path."""
    app_env = environ.get("APP_ENV") or "development"
    if app_env != "development":
        # Anyone can sign in to it as anyone: it must never run where real people sign in.
        raise SystemExit(f"Configuration error: the stand-in provider is for development only; it refuses APP_ENV={app_env!r}.")
    issuer = (environ.get("STANDIN_ISSUER") or "").rstrip("/")
    mount = urlsplit(issuer).path
    if not issuer.startswith(("http://", "https://")) or not mount:
        raise SystemExit("Configuration error: STANDIN_ISSUER must be the stand-in's public URL with a path, such as http://localhost:8080/standin.")
    ttl = environ.get("STANDIN_ACCESS_TOKEN_TTL") or "3599"
    if not ttl.isdigit():
        raise SystemExit(f"Configuration error: STANDIN_ACCESS_TOKEN_TTL must be a whole number of seconds, got {ttl!r}.")
    database_url = environ.get("STANDIN_DATABASE_URL")
    if not database_url:
        (Path.cwd() / "instance").mkdir(exist_ok=True)
        database_url = f"sqlite:///{Path.cwd() / 'instance' / 'standin.sqlite'}"
    provider = standin.create_app(
        {
            "issuer": issuer,
            # The same variable names as the app's, so one .env configures both sides of the demo.
            "clients": {environ.get("OAUTH_CLIENT_ID") or "standin-client": environ.get("OAUTH_CLIENT_SECRET") or "standin-secret"},
            "redirect_uris": (environ.get("STANDIN_REDIRECT_URIS") or "").split(),
            "database_url": database_url,
            "access_ttl": int(ttl),
            "strict": (environ.get("STANDIN_STRICT") or "").lower() in TRUE,
            "narrows_quietly": (environ.get("STANDIN_NARROWS_QUIETLY") or "").lower() in TRUE,
            "introspects_access_only": (environ.get("STANDIN_INTROSPECTS_ACCESS_ONLY") or "").lower() in TRUE,
            "grant_per_authorization": (environ.get("STANDIN_GRANT_PER_AUTHORIZATION") or "").lower() in TRUE,
        }
    )
    return DispatcherMiddleware(NotFound(), {mount: provider})
