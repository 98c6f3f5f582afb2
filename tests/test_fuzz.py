"""Random cookies and query strings at every GET route: never a 5xx, and the signed-in person keeps their sign-in."""

from urllib.parse import quote, urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import callback_params, sign_in, stored_user

COOKIE_NAMES = ["session", "signin", "__Host-session", "__Host-signin", "junk"]
PARAM_NAMES = ["state", "code", "iss", "error", "error_description", "next", "session", "q"]
# Latin-1 text that survives in a header, and any text at all for query values.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters=';,"'), max_size=300)
cookies = st.dictionaries(st.sampled_from(COOKIE_NAMES), header_text, max_size=4)
params = st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=10), st.text(max_size=200), max_size=5)
raw_query = st.binary(max_size=200).map(lambda b: quote(b, safe="=&%+"))


def get_routes(app) -> list[str]:
    return sorted(rule.rule for rule in app.url_map.iter_rules() if "GET" in rule.methods and not rule.arguments)


def test_random_cookies_and_query_strings_never_get_a_5xx(app_factory):
    app = app_factory(SIGNIN_RATE_LIMIT="off")
    ada = app.test_client()
    sign_in(ada)
    before = stored_user(app)
    # A real pre-sign-in cookie and its state, so some examples get past the cookie checks.
    starter = app.test_client()
    location = starter.get("/auth/login").headers["Location"]
    flow_cookie_value = starter.get_cookie("signin").value
    real_state = callback_params(location)["state"]
    routes = get_routes(app)
    assert "/auth/callback" in routes and "/api/viewer-token" in routes

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cookies=cookies, params=params, raw=raw_query, use_real_flow=st.booleans(), use_real_state=st.booleans())
    def probe(cookies, params, raw, use_real_flow, use_real_state):
        if use_real_flow:
            cookies = cookies | {"signin": flow_cookie_value}
        if use_real_state:
            params = params | {"state": real_state}
        header = "; ".join(f"{name}={value}" for name, value in cookies.items())
        browser = app.test_client(use_cookies=False)
        for route in routes:
            for query in (params, raw):
                reply = browser.get(route, query_string=query, headers={"Cookie": header} if header else {})
                assert reply.status_code < 500, (route, query, header, reply.status_code)
                if reply.status_code == 302:
                    target = urlsplit(reply.headers["Location"])
                    # Every redirect stays here or goes to the provider, never to a place from the input.
                    assert not target.netloc or target.netloc == "localhost", reply.headers["Location"]
                reply.close()

    probe()
    assert ada.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    assert stored_user(app).refresh_token == before.refresh_token


def test_random_posts_never_get_a_5xx_nor_change_anything(app_factory):
    app = app_factory(SIGNIN_RATE_LIMIT="off")
    ada = app.test_client()
    sign_in(ada)
    before = stored_user(app)
    routes = sorted(rule.rule for rule in app.url_map.iter_rules() if "POST" in rule.methods)
    header_names = st.sampled_from(["Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode", "X-CSRF-Token", "Content-Type", "Referer"])
    forms = st.dictionaries(st.sampled_from(["csrf_token", "session", "next"]) | st.text(max_size=10), st.text(max_size=200), max_size=4)

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(form=forms, headers=st.dictionaries(header_names, header_text, max_size=4), as_ada=st.booleans(), route=st.sampled_from(routes))
    def probe(form, headers, as_ada, route):
        browser = ada if as_ada else app.test_client()
        reply = browser.post(route, data=form, headers=headers)
        assert reply.status_code < 500, (route, form, headers, reply.status_code)
        # A forged request can never carry this session's token, so it never signs Ada out.
        assert reply.status_code != 302 or not as_ada, (route, form, headers)

    probe()
    assert ada.get("/api/session").get_json()["user"]["name"] == "Ada Lovelace"
    assert stored_user(app).refresh_token == before.refresh_token
