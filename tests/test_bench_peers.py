"""The benchmarks' peer apps (bench/peers/) still do what their docstrings say, so the comparison stays honest."""

import importlib
import os

import pytest
from sqlalchemy import update

from standin.store import Store

PEERS = {"P1": "bench.peers.p1_user_loader", "P2": "bench.peers.p2_request_loader"}
COOKIES = {"P1": "session", "P2": "sid"}


@pytest.fixture(params=list(PEERS))
def peer(request, tmp_path, monkeypatch):
    """Return (name, module, app) for a peer on a fresh SQLite database, with the strict stand-in embedded."""
    settings = {
        "SECRET_KEY": "test-secret",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'peer.sqlite'}",
        "TOKEN_ENCRYPTION_KEYS": "8dPAA3qIkpHyELgsyIDmxI0ZBvP5jsC5Ys2yLAOFb3g=",
        "OAUTH_ISSUER": "http://localhost/standin",
        "STANDIN_DATABASE_URL": f"sqlite:///{tmp_path / 'standin.sqlite'}",
        "STANDIN_STRICT": "true",
        "SESSION_COOKIE_SECURE": "false",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    module = importlib.import_module(PEERS[request.param])
    app = module.create_app()
    with app.app_context():
        module.db.create_all()
    yield request.param, module, app
    with app.app_context():
        module.db.engine.dispose()


def sign_in(client) -> None:
    authorize = client.get("/auth/login").headers["Location"]
    callback = client.post(authorize, data={"name": "Ada Lovelace"}).headers["Location"]
    assert client.get(callback).headers["Location"] == "/"


def test_peer_answers_who_is_signed_in(peer):
    _, _, app = peer
    client = app.test_client()
    assert client.get("/api/session").status_code == 401
    sign_in(client)
    reply = client.get("/api/session").get_json()
    assert reply["signed_in"] and reply["user"]["name"] == "Ada Lovelace" and reply["access_token_expires_at"]


def test_peer_refreshes_an_expired_access_token(peer):
    _, module, app = peer
    client = app.test_client()
    sign_in(client)
    with app.app_context():
        module.db.session.execute(update(module.User).values(expires_at=0))
        module.db.session.commit()
    store = Store(os.environ["STANDIN_DATABASE_URL"])
    assert client.get("/api/session").status_code == 200
    assert client.get("/api/session").status_code == 200
    assert store.count("refresh") == 1


def test_only_p2_signs_a_copied_cookie_out_at_once(peer):
    name, _, app = peer
    client = app.test_client()
    sign_in(client)
    copy = client.get_cookie(COOKIES[name]).value
    assert client.post("/auth/logout").status_code == 200
    other = app.test_client()
    other.set_cookie(COOKIES[name], copy)
    # P1's cookie carries the sign-in itself; P2's names a row that the sign-out deleted.
    assert other.get("/api/session").status_code == (200 if name == "P1" else 401)
