"""gunicorn settings shared by the image's entrypoint, the demo, the compose stand-in and the tests.

    gunicorn --config gunicorn.conf.py 'app:create_app()'

Options on the command line (and GUNICORN_CMD_ARGS) take precedence over these.
"""

from urllib.parse import quote

from gunicorn.glogging import Logger

# The path without its query string (the callback's query carries the provider's one-time code).
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'

# ProxyFix (TRUSTED_PROXY_COUNT) is the one place that believes X-Forwarded-*: gunicorn's own
# default trusts them from 127.0.0.1, so any local client could make the redirect URI https.
forwarded_allow_ips = ""

# Characters a path may carry as they are; everything else (%, spaces, quotes, control characters,
# non-ASCII) is written percent-encoded.
PATH_SAFE = "/:@!$&'()*+,;=-._~"


class PathEscapingLogger(Logger):
    """Write the request path percent-encoded, so a %0a in a URL cannot start a forged log line."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        # WSGI hands the decoded path over as Latin-1 text; its bytes are what the client sent.
        atoms["U"] = quote((environ.get("PATH_INFO") or "").encode("latin-1", "replace"), safe=PATH_SAFE)
        return atoms


logger_class = PathEscapingLogger


def on_starting(server) -> None:
    """Check the app's settings once, in the master, before any worker starts.

    A worker that fails to load the app exits with code 1, which gunicorn answers by starting another,
    for ever: a missing SECRET_KEY would never stop. Refused here, gunicorn exits at once with the sentence.
    """
    if (getattr(server.app, "app_uri", None) or "").split(":")[0] != "app":
        return  # another app under the same settings (the compose stand-in)
    import config
    from app import load_config

    try:
        load_config()
    except config.ConfigError as exc:
        raise SystemExit(f"Configuration error: {exc}") from None
