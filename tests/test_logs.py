"""Request ids and JSON log lines, in-process (tests/test_observability.py reads a real gunicorn's)."""

import json
import logging
import sys

import pytest

import config
import logs


def test_a_request_id_is_made_and_echoed(client):
    first, second = client.get("/healthz").headers["X-Request-ID"], client.get("/healthz").headers["X-Request-ID"]
    assert len(first) == 32 and first != second


def test_a_clients_request_id_is_ignored_without_a_trusted_proxy(client):
    """Straight from a client, X-Request-ID could pass one request off as another in the logs: a new id replaces it."""
    echoed = client.get("/healthz", headers={"X-Request-ID": "chosen-by-a-client"}).headers["X-Request-ID"]
    assert echoed != "chosen-by-a-client" and len(echoed) == 32


def test_a_trusted_proxys_request_id_is_kept_when_plain(app_factory):
    client = app_factory(TRUSTED_PROXY_COUNT=1).test_client()
    assert client.get("/healthz", headers={"X-Request-ID": "edge-7f3a:1"}).headers["X-Request-ID"] == "edge-7f3a:1"
    for unusable in ("", "two words", "x" * 129, "ünïcode", 'a"quote'):
        echoed = client.get("/healthz", headers={"X-Request-ID": unusable}).headers["X-Request-ID"]
        assert echoed != unusable and len(echoed) == 32


def test_a_request_id_is_on_the_lines_written_during_the_request(app_factory):
    app = app_factory(TRUSTED_PROXY_COUNT=1)

    @app.get("/test-log")
    def write_a_line():
        logging.getLogger("test.request_id").warning("during the request")
        return "ok"

    written: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.addFilter(logs.RequestIdFilter())
    handler.emit = written.append
    logging.getLogger("test.request_id").addHandler(handler)
    try:
        app.test_client().get("/test-log", headers={"X-Request-ID": "req-42"}).close()  # as a server does when the body is sent
        logging.getLogger("test.request_id").warning("after the request")
    finally:
        logging.getLogger("test.request_id").removeHandler(handler)
    assert [record.request_id for record in written] == ["req-42", None]


def format_json(record: logging.LogRecord) -> dict:
    line = logs.JsonLines().format(record)
    assert "\n" not in line
    return json.loads(line)


def test_a_traceback_is_one_field_of_one_line():
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        record = logging.LogRecord("app", logging.ERROR, __file__, 1, "Exception on /x [GET]", None, sys.exc_info())
    fields = format_json(record)
    assert fields["message"] == "Exception on /x [GET]" and fields["level"] == "ERROR" and fields["logger"] == "app"
    assert fields["exc_info"].startswith("Traceback (most recent call last):") and "ValueError: broken\nacross lines" in fields["exc_info"]


def test_an_event_written_as_json_becomes_fields():
    event = {"event": "token_refresh", "outcome": "refreshed", "level": "not the level"}
    fields = format_json(logging.LogRecord("tokens", logging.INFO, __file__, 1, json.dumps(event), None, None))
    assert (fields["message"], fields["event"], fields["outcome"], fields["level"]) == ("token_refresh", "token_refresh", "refreshed", "INFO")


FORMATS = [({}, "text"), ({"APP_ENV": "production"}, "json"), ({"LOG_FORMAT": "json"}, "json"), ({"APP_ENV": "production", "LOG_FORMAT": "text"}, "text")]


@pytest.mark.parametrize(("environ", "expected"), FORMATS)
def test_log_format_defaults_to_text_in_development_and_json_in_production(environ, expected):
    assert config.log_format(environ) == expected


def test_log_format_refuses_other_values():
    with pytest.raises(config.ConfigError, match="LOG_FORMAT must be text or json"):
        config.log_format({"LOG_FORMAT": "xml"})
