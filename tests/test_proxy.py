"""GET /api/aps/<path>: the person's token goes to the API host for allowed paths only, and its answer comes back bounded."""

import base64
import threading
import time
from urllib.parse import quote, urlsplit

import pytest

from conftest import ISSUER, sign_in, stored_user


def proxied(href: str) -> str:
    """Turn an API link (links.next, relationships) into the same request through the proxy, encoding kept."""
    parts = urlsplit(href)
    path = parts.path[len(urlsplit(ISSUER).path) :]
    return "/api/aps" + path + (f"?{parts.query}" if parts.query else "")


def revoke_access_token(app, name: str = "Ada Lovelace") -> None:
    """Revoke the person's access token at the provider, as a sign-out elsewhere would, before it expires."""
    provider = app.extensions["standin"].test_client()
    basic = base64.b64encode(b"standin-client:standin-secret").decode()
    token = stored_user(app, name).access_token
    assert provider.post("/authentication/v2/revoke", data={"token": token}, headers={"Authorization": f"Basic {basic}"}).status_code == 200


def api_calls(standin) -> int:
    return standin.count("api")


def test_browses_hubs_projects_folders_and_pages_through_the_proxy(client, standin):
    sign_in(client)
    hubs = client.get("/api/aps/project/v1/hubs")
    assert hubs.status_code == 200
    assert hubs.content_type == "application/json"
    assert [h["attributes"]["name"] for h in hubs.json["data"]] == ["Ada Lovelace's personal hub", "Stand-in Construction"]
    assert "Set-Cookie" not in hubs.headers and "Authorization" not in hubs.headers
    projects = client.get(proxied(hubs.json["data"][1]["relationships"]["projects"]["links"]["related"]["href"]))
    folders = client.get(proxied(projects.json["data"][0]["relationships"]["topFolders"]["links"]["related"]["href"]))
    plans = folders.json["data"][1]
    url, names = proxied(plans["relationships"]["contents"]["links"]["related"]["href"]), []
    while url:
        page = client.get(url)
        assert page.status_code == 200, page.json
        names += [e["attributes"]["displayName"] for e in page.json["data"]]
        url = proxied(page.json["links"]["next"]["href"]) if "next" in page.json["links"] else None
    assert names == [f"Sheet A-{n}.dwg" for n in range(101, 113)]
    item = client.get(proxied(folders.json["data"][0]["relationships"]["contents"]["links"]["related"]["href"])).json["data"][2]
    versions = client.get(proxied(item["relationships"]["versions"]["links"]["related"]["href"]))
    assert [v["attributes"]["versionNumber"] for v in versions.json["data"]] == [3, 2, 1]


def test_the_query_goes_through_with_its_encoding(client):
    sign_in(client)
    hubs = client.get("/api/aps/project/v1/hubs?page%5Bnumber%5D=1&page%5Blimit%5D=1")
    assert [h["attributes"]["name"] for h in hubs.json["data"]] == ["Stand-in Construction"]
    assert hubs.json["links"]["self"]["href"].endswith("/project/v1/hubs?page%5Bnumber%5D=1&page%5Blimit%5D=1")
    # The API host's refusal of a bad query is its answer to give: status and body come back as they are.
    bad = client.get("/api/aps/project/v1/hubs?page[limit]=abc")
    assert bad.status_code == 400 and bad.json["errors"][0]["code"] == "BAD_INPUT"


REFUSED = [
    "/api/aps/authentication/v2/token",
    "/api/aps/userinfo",
    "/api/aps/project/v1/hubs/x",
    "/api/aps/project/v1/hubs/x/projects/y",
    "/api/aps/project/v1/hubs/../../userinfo",
    "/api/aps/project/v1/hubs/%2e%2e/%2E%2E/userinfo",
    "/api/aps/project/v1/hubs/./projects",
    "/api/aps/project/v1/hubs/.../projects",
    "/api/aps/project%2Fv1%2Fhubs",
    "/api/aps/project/v1/hubs/a%2F..%2F..%2F..%2Fuserinfo/projects",
    "/api/aps/project/v1/hubs/a%252F..%252Fb/projects",
    "/api/aps/project/v1/hubs/a%5C..%5Cb/projects",
    "/api/aps/project/v1/hubs/a\\b/projects",
    "/api/aps/project/v1/hubs/a%00/projects",
    "/api/aps/project/v1/hubs//projects",
    "/api/aps/project/v1/hubs/",
    "/api/aps/data/v1/projects/p/folders/f/contents/../../../../../authentication/v2/keys",
    "/api/aps/PROJECT/v1/hubs",
    "/api/aps/",
]


@pytest.mark.parametrize("path", REFUSED)
def test_paths_off_the_list_are_404_without_an_upstream_call(client, standin, path):
    sign_in(client)
    before = api_calls(standin)
    reply = client.get(path)
    assert reply.status_code == 404, reply.get_data(as_text=True)
    assert reply.json["error"] == "not_found"
    assert api_calls(standin) == before


def test_a_signed_out_browser_gets_401_and_the_api_host_is_not_asked(client, standin):
    reply = client.get("/api/aps/project/v1/hubs")
    assert reply.status_code == 401 and reply.json["error"] == "not_signed_in"
    assert api_calls(standin) == 0


def test_a_revoked_access_token_is_refreshed_once_and_the_call_retried(app, client, standin):
    sign_in(client)
    revoke_access_token(app)
    hubs = client.get("/api/aps/project/v1/hubs")
    assert hubs.status_code == 200 and len(hubs.json["data"]) == 2
    assert standin.count("refresh") == 2  # the viewer token's at sign-in, then this one
    assert api_calls(standin) == 2  # refused, then the retry


def test_a_dead_grant_behind_a_refused_token_asks_for_sign_in(app, client, standin):
    sign_in(client)
    provider = app.extensions["standin"].test_client()
    basic = base64.b64encode(b"standin-client:standin-secret").decode()
    provider.post("/authentication/v2/revoke", data={"token": stored_user(app).refresh_token}, headers={"Authorization": f"Basic {basic}"})
    revoke_access_token(app)
    reply = client.get("/api/aps/project/v1/hubs")
    assert reply.status_code == 401 and reply.json["error"] == "sign_in_required"
    assert client.get("/api/session").status_code == 401


def test_an_api_401_to_a_freshly_renewed_token_is_passed_on_and_no_one_is_signed_out(app, standin):
    """An API answering 401 for a path anyone may choose cannot sign the person out: refresh once, retry once, then say so."""
    here, there = app.test_client(), app.test_client()
    sign_in(here)
    sign_in(there)
    standin.inject("api_401", count=2)
    reply = here.get("/api/aps/project/v1/hubs")
    assert reply.status_code == 403
    assert reply.json["error"] == "provider_refused" and reply.json["cause"] == "invalid_token" and "still signed in" in reply.json["message"]
    assert api_calls(standin) == 2  # refused, then refused again with the renewed token
    for browser in (here, there):
        assert browser.get("/api/session").status_code == 200
        assert browser.get("/api/aps/project/v1/hubs").status_code == 200
    assert stored_user(app).refresh_token is not None


def test_a_cross_site_navigation_to_the_api_is_refused(client, standin):
    """A link on another site must not reach /api/ with the person's cookie: it is for our own pages and scripts."""
    sign_in(client)
    navigation = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    for path in ("/api/aps/project/v1/hubs", "/api/profile", "/api/viewer-token"):
        reply = client.get(path, headers=navigation)
        assert reply.status_code == 403 and reply.is_json, path
    assert api_calls(standin) == 0
    assert client.get("/session", headers=navigation).status_code == 200  # pages still open from a link


def test_upstream_5xx_is_502_and_the_sign_in_stays(client, standin):
    sign_in(client)
    standin.inject("api_5xx")
    reply = client.get("/api/aps/project/v1/hubs")
    assert reply.status_code == 502 and reply.json["error"] == "upstream_error"
    assert client.get("/api/session").status_code == 200
    assert client.get("/api/aps/project/v1/hubs").status_code == 200


def test_a_slow_upstream_is_504_and_the_sign_in_stays(app_factory, standin_for):
    app = app_factory(APS_PROXY_TIMEOUT=1)
    client = app.test_client()
    sign_in(client)
    standin_for(app).inject("api_slow", delay=1.5)
    reply = client.get("/api/aps/project/v1/hubs")
    assert reply.status_code == 504 and reply.json["error"] == "upstream_timeout"
    assert client.get("/api/session").status_code == 200


def test_an_oversized_answer_is_502(app_factory, standin_for):
    app = app_factory(APS_PROXY_MAX_BYTES=64 * 1024)
    client = app.test_client()
    sign_in(client)
    standin_for(app).inject("api_large", delay=0.5)  # half a mebibyte
    reply = client.get("/api/aps/project/v1/hubs")
    assert reply.status_code == 502 and reply.json["error"] == "upstream_too_large"
    assert client.get("/api/aps/project/v1/hubs").status_code == 200  # a normal page fits
    small = app_factory(APS_PROXY_MAX_BYTES=100).test_client()
    sign_in(small, "Grace Hopper")
    assert small.get("/api/aps/project/v1/hubs").json["error"] == "upstream_too_large"


def test_a_token_without_data_read_gets_the_api_hosts_403(app_factory):
    client = app_factory(OAUTH_SCOPES="user-profile:read viewables:read").test_client()
    sign_in(client)
    reply = client.get("/api/aps/project/v1/hubs")
    assert reply.status_code == 403 and reply.json["errorCode"] == "AUTH-010"
    assert client.get("/api/session").status_code == 200


def test_the_allow_list_is_configurable(app_factory):
    client = app_factory(APS_PROXY_PATHS=("project/v1/hubs/*/projects",)).test_client()
    sign_in(client)
    assert client.get("/api/aps/project/v1/hubs").status_code == 404


def test_other_providers_have_no_api_to_forward_to(app_factory, standin_for):
    app = app_factory()
    app.config["OAUTH_PROVIDER"] = "oidc"  # after start-up: the stand-in still answers sign-in
    client = app.test_client()
    sign_in(client)
    assert client.get("/api/aps/project/v1/hubs").status_code == 404
    assert standin_for(app).count("api") == 0


def test_random_paths_and_queries_never_get_a_5xx_nor_leave_the_list(client, standin):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    sign_in(client)
    pieces = st.sampled_from(["project", "v1", "hubs", "projects", "data", "folders", "contents", "..", ".", "%2e", "%2F", "%5C", "%25", "a:b", "", "x"])
    segment = st.lists(pieces, min_size=1, max_size=3).map("".join) | st.text(max_size=8).map(lambda s: s.replace("/", "").replace("?", ""))
    allowed_calls = []

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(segments=st.lists(segment, min_size=1, max_size=7), query=st.binary(max_size=60))
    def probe(segments, query):
        before = api_calls(standin)
        reply = client.get("/api/aps/" + "/".join(segments), query_string=quote(query, safe="=&%+[]"))
        assert reply.status_code < 500 or reply.status_code in (502, 504), (segments, query, reply.status_code)
        if api_calls(standin) != before:
            allowed_calls.append(segments)
            assert all(s not in ("..", ".", "%2e", "%2E") and "%2F" not in s and "%5C" not in s for s in segments), segments

    probe()


@pytest.fixture
def api_over_http(app):
    """Serve the app's own stand-in over real HTTP on a port of its own, and point the proxy at it: a real socket, streamed."""
    import threading

    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app.extensions["standin"], threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    app.config["APS_API_URL"] = f"http://127.0.0.1:{server.server_port}"
    yield
    server.shutdown()
    thread.join()


def test_over_a_real_connection_the_time_and_size_bounds_hold(app, client, standin, api_over_http):
    sign_in(client)
    assert client.get("/api/aps/project/v1/hubs").status_code == 200
    app.config["APS_PROXY_TIMEOUT"] = 1
    standin.inject("api_slow", delay=2)
    slow = client.get("/api/aps/project/v1/hubs")
    assert slow.status_code == 504 and slow.json["error"] == "upstream_timeout"
    app.config["APS_PROXY_TIMEOUT"] = 10
    standin.inject("api_large", delay=1)  # a mebibyte, announced in Content-Length
    app.config["APS_PROXY_MAX_BYTES"] = 64 * 1024
    large = client.get("/api/aps/project/v1/hubs")
    assert large.status_code == 502 and large.json["error"] == "upstream_too_large"
    standin.inject("api_5xx")
    assert client.get("/api/aps/project/v1/hubs").status_code == 502
    assert client.get("/api/session").status_code == 200


class APIHost:
    """A real HTTP API host on a port of its own: answers hubs as JSON, sets a cookie, and remembers the cookies it was sent.

    With trickle set, the body comes one byte at a time, that many seconds apart, announced in a
    Content-Length or sent chunked: a server that is slow but never silent for a whole read timeout.
    """

    BODY = b'{"data": []}'

    def __init__(self):
        self.cookies: list[str | None] = []
        self.trickle: float | None = None
        self.chunked = False
        self.stop = threading.Event()

    def __call__(self, environ, start_response):
        self.cookies.append(environ.get("HTTP_COOKIE"))
        headers = [("Content-Type", "application/json"), ("Set-Cookie", f"api_session=for-request-{len(self.cookies)}; Path=/")]
        if not self.chunked:
            headers.append(("Content-Length", str(len(self.BODY) * 10 if self.trickle else len(self.BODY))))
        start_response("200 OK", headers)
        return self._trickled() if self.trickle else [self.BODY]

    def _trickled(self):
        for _ in range(len(self.BODY) * 10):
            if self.stop.wait(self.trickle):  # the test is over: stop sending
                return
            yield b" "


@pytest.fixture(scope="module")
def api_host():
    from werkzeug.serving import make_server

    host = APIHost()
    server = make_server("127.0.0.1", 0, host, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield host, f"http://127.0.0.1:{server.server_port}"
    host.stop.set()
    server.shutdown()
    thread.join()


@pytest.fixture
def api(api_host):
    host, url = api_host
    host.cookies.clear()
    host.trickle, host.chunked = None, False
    return host, url


def test_no_cookie_goes_to_or_comes_back_from_the_api_host(app_factory, api):
    host, url = api
    app = app_factory(APS_API_URL=url)
    alice, bob = app.test_client(), app.test_client()
    sign_in(alice, "Alice")
    sign_in(bob, "Bob")
    first = alice.get("/api/aps/project/v1/hubs")
    assert first.status_code == 200 and "api_session" not in first.headers.get("Set-Cookie", "")
    assert bob.get("/api/aps/project/v1/hubs").status_code == 200
    assert alice.get("/api/aps/project/v1/hubs").status_code == 200
    assert host.cookies == [None, None, None]  # Bob's request never carries what the API host set for Alice's


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_trickled_answer_is_cut_off_at_the_deadline(app_factory, api, chunked):
    host, url = api
    app = app_factory(APS_API_URL=url, APS_PROXY_TIMEOUT=1)
    client = app.test_client()
    sign_in(client)
    host.trickle, host.chunked = 0.05, chunked  # the whole body would take 6 s, with no pause near the read timeout
    started = time.monotonic()
    reply = client.get("/api/aps/project/v1/hubs")
    elapsed = time.monotonic() - started
    assert reply.status_code == 504 and reply.json["error"] == "upstream_timeout"
    assert 1 <= elapsed < 2, elapsed
    assert client.get("/api/session").status_code == 200
