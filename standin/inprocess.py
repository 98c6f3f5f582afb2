"""A requests transport that hands requests to a WSGI app in this process instead of the network."""

import time
from urllib.parse import urlsplit

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from werkzeug.test import Client


class WSGIAdapter(BaseAdapter):
    """Serve requests for base_url from wsgi_app, so an app calling its embedded provider cannot deadlock.

    A sync gunicorn worker that called itself over HTTP would wait forever for its own reply.
    Timeouts and dropped replies that the stand-in simulates surface as the same requests
    exceptions a real network gives.
    """

    def __init__(self, wsgi_app, base_url: str):
        super().__init__()
        self.client = Client(wsgi_app)
        self.base_url = base_url.rstrip("/")

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        started = time.monotonic()
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
        if read_timeout is not None and time.monotonic() - started > read_timeout:
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
