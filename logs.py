"""Log lines: text for a person at a terminal, or one JSON object per line for a log pipeline (LOG_FORMAT).

Every line written while a request is served carries its request id: the X-Request-ID a trusted proxy
sent, or one made here, echoed in the response. gunicorn.conf.py gives gunicorn's own loggers the
same JSON lines (gunicorn_logconfig); the app's share the root logger's handler.
"""

import contextvars
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Mapping

from flask import Flask
from pythonjsonlogger.json import JsonFormatter
from werkzeug.wsgi import ClosingIterator

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The fields every JSON line starts with; renamed below to the names log pipelines expect.
JSON_FIELDS = ("levelname", "name", "message", "request_id")
RENAMED = {"levelname": "level", "name": "logger"}
# An id from the proxy is written into every line of its request: only a short, plain one is kept.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=@/-]{1,128}")
# What gunicorn's access line is made of (gunicorn.conf.py's atoms), as fields of their own.
ACCESS_FIELDS = {"h": "remote", "m": "method", "U": "path", "H": "protocol", "s": "status", "B": "bytes", "M": "duration_ms"}

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def init_app(app: Flask) -> None:
    """Number each request, and send log lines to stderr in LOG_FORMAT unless a server (gunicorn) set logging up already."""
    app.wsgi_app = RequestId(app.wsgi_app, trust_header=app.config["TRUSTED_PROXY_COUNT"] > 0)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(JsonLines() if app.config["LOG_FORMAT"] == "json" else logging.Formatter(TEXT_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    if app.config["LOG_FORMAT"] == "json":
        logging.captureWarnings(True)  # a warning is a log line too, not free text on stderr
    logging.getLogger("tokens").setLevel(logging.INFO)


class RequestId:
    """WSGI middleware: give the request an id, keep it for its log lines, and echo it as X-Request-ID."""

    def __init__(self, app: Callable, trust_header: bool):
        self.app, self.trust_header = app, trust_header

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        # Only a trusted proxy's header is believed: a client could otherwise pass for any other request.
        sent = environ.get("HTTP_X_REQUEST_ID", "") if self.trust_header else ""
        current = sent if VALID_REQUEST_ID.fullmatch(sent) else secrets.token_hex(16)
        request_id.set(current)

        def start(status: str, headers: list, exc_info=None) -> Callable:
            headers.append(("X-Request-ID", current))
            return start_response(status, headers, exc_info)

        # gunicorn writes the access line before it closes the body: the id is still set for it.
        return ClosingIterator(self.app(environ, start), lambda: request_id.set(None))


class RequestIdFilter(logging.Filter):
    """Put the current request's id on every record a handler writes (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonLines(JsonFormatter):
    """Format a record as one JSON object: time, level, logger, message, request id, and a traceback as one field."""

    def __init__(self):
        super().__init__(JSON_FIELDS, rename_fields=RENAMED, timestamp="time")

    def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_data, record, message_dict)
        message = log_data.get("message")
        if isinstance(message, str) and message.startswith("{"):
            # An app event written as JSON text (tokens.py) becomes fields, not a string inside a string.
            event = _json_object(message)
            if event is not None:
                log_data["message"] = str(event.get("event", ""))  # every line keeps a message, here the event's name
                log_data.update({key: value for key, value in event.items() if key not in log_data})
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            log_data.update({field: record.args.get(atom) for atom, field in ACCESS_FIELDS.items()})
            log_data["status"] = _number(log_data["status"])


def gunicorn_logconfig() -> dict:
    """Return gunicorn's logconfig_dict: its error and access loggers, and the root logger the app uses, all in JSON lines on stderr."""
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "json", "filters": ["request_id"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"json": {"()": JsonLines}},
        "handlers": {"stderr": handler},
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        },
    }


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _number(value: object) -> object:
    return int(value) if isinstance(value, str) and value.isdigit() else value
