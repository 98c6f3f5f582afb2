"""What real providers do differently from APS (issue 12), each found by tests/test_interop.py or seen elsewhere.

These run in-process against the stand-in, with `responses` only where a provider quirk must be faked.
"""

from conftest import sign_in


def count_refresh_calls(app, monkeypatch) -> list:
    """Count the app's refresh requests to the provider, whatever the provider answers."""
    provider, calls = app.extensions["provider"], []
    real = provider.refresh
    monkeypatch.setattr(provider, "refresh", lambda *args, **kwargs: calls.append(kwargs.get("scope")) or real(*args, **kwargs))
    return calls


def test_refused_refresh_is_a_clear_4xx_that_keeps_the_sign_in_and_is_not_retried(app_factory, monkeypatch):
    """A provider's invalid_scope is an answer, not an outage: 403 naming it, no retry on the next request."""
    # The viewer scope is not part of the grant (as with the README's OIDC settings): the provider refuses it.
    app = app_factory(OAUTH_VIEWER_SCOPE="data:create")
    client = app.test_client()
    sign_in(client)
    calls = count_refresh_calls(app, monkeypatch)

    for _ in range(3):
        reply = client.get("/api/viewer-token")
        assert reply.status_code == 403
        body = reply.get_json()
        assert body["error"] == "provider_refused" and body["cause"] == "invalid_scope"
        assert "invalid_scope" in body["message"] and "still signed in" in body["message"]
    assert calls == ["data:create"]  # the refusal was remembered, and the provider not asked again
    assert client.get("/api/profile").status_code == 200
    page = client.get("/viewer-token-does-not-exist")
    assert page.status_code == 404  # the session cookie survived: an ordinary 404, not a sign-in redirect
    assert client.get_cookie("session") is not None
