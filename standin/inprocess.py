"""A requests transport that hands requests to a WSGI app in this process instead of the network."""

import time
from urllib.parse import urlsplit

import requests
from flask import g
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from werkzeug.test import Client

# How long the stand-in was told to take over a reply (slow_down), which the adapter times instead of the clock.
SLEPT_HEADER = "X-Standin-Slept"


def slow_down(seconds: float) -> None:
    """Take seconds longer over this reply, as a slow provider would; an in-process caller times this, not the clock."""
    time.sleep(seconds)
    g.standin_slept = g.get("standin_slept", 0.0) + seconds


def mark_slept(response):
    """Say on the reply how long slow_down made it take."""
    if g.get("standin_slept"):
        response.headers[SLEPT_HEADER] = str(g.standin_slept)
    return response


class WSGIAdapter(BaseAdapter):
    """Serve requests for base_url from wsgi_app, so an app calling its embedded provider cannot deadlock.

    A sync gunicorn worker that called itself over HTTP would wait forever for its own reply.
    Timeouts and dropped replies that the stand-in simulates surface as the same requests
    exceptions a real network gives. A reply times out when the stand-in was told to take longer
    than the read timeout (slow_down), not when this process waited for a core: a test machine's
    load is not the provider's slowness.
    """

    def __init__(self, wsgi_app, base_url: str):
        super().__init__()
        self.client = Client(wsgi_app)
        self.base_url = base_url.rstrip("/")

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        path = urlsplit(request.url)
        script_root = urlsplit(self.base_url).path
        reply = self.client.open(
            path=path.path[len(script_root) :] or "/",
            base_url=self.base_url,
            query_string=path.query,
            method=request.method,
            headers=list(request.headers.items()),
            data=request.body,
        )
        if reply.headers.get("X-Standin-Drop"):
            raise requests.ConnectionError("connection dropped before the reply", request=request)
        read_timeout = timeout[1] if isinstance(timeout, tuple) else timeout
        if read_timeout is not None and float(reply.headers.get(SLEPT_HEADER, 0)) > read_timeout:
            raise requests.ReadTimeout("provider did not answer in time", request=request)
        response = requests.Response()
        response.status_code = reply.status_code
        response.headers = CaseInsensitiveDict(reply.headers)
        response._content = reply.get_data()
        response._content_consumed = True  # iter_content (a streaming caller) reads _content, there is no raw stream
        response.encoding = reply.mimetype_params.get("charset", "utf-8")
        response.url = request.url
        response.request = request
        response.reason = reply.status.partition(" ")[2]
        return response

    def close(self):
        pass
