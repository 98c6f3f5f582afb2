"""What both peers share, and what the comparison is not about: the OAuth client and the encrypted column.

The client signs people in by authorization code with PKCE and refreshes, over requests; its calls
mirror Authlib's Flask client (authorize_redirect, authorize_access_token), so the peers read like
the apps people write with it. Its provider is the stand-in, embedded as app.py embeds it in ours,
so every server in a comparison reaches the same kind of provider, in-process, with the same
settings (STANDIN_*). Against APS a peer would keep the client and drop the embedding.

Run a peer from the repository's root, configured by the same variables as ours (DATABASE_URL,
SECRET_KEY, TOKEN_ENCRYPTION_KEYS, OAUTH_ISSUER, TOKEN_REFRESH_LEEWAY, STANDIN_*):

    flask --app bench.peers.p1_user_loader init-db
    gunicorn --config gunicorn.conf.py --workers 2 --threads 4 'bench.peers.p1_user_loader:create_app()'
"""

import base64
import hashlib
import os
import secrets
from urllib.parse import urlencode, urlsplit

import requests
from cryptography.fernet import Fernet
from flask import Flask, Response, redirect, request, session
from sqlalchemy import Text, TypeDecorator
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import standin
from standin.inprocess import WSGIAdapter

fernet = Fernet(os.environ["TOKEN_ENCRYPTION_KEYS"].split(",")[0])


class Encrypted(TypeDecorator):
    """A token column, Fernet-encrypted like ours."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return fernet.encrypt(value.encode()).decode()

    def process_result_value(self, value, dialect):
        return fernet.decrypt(value.encode()).decode()


class OAuthClient:
    def __init__(self, app: Flask):
        env = os.environ.get
        self.issuer = env("OAUTH_ISSUER", "http://localhost:5000/standin").rstrip("/")
        self.client = (env("OAUTH_CLIENT_ID", "standin-client"), env("OAUTH_CLIENT_SECRET", "standin-secret"))
        self.scopes = env("OAUTH_SCOPES", "user-profile:read data:read data:write viewables:read")
        self.token_url = f"{self.issuer}/authentication/v2/token"
        provider = standin.create_app(
            {
                "issuer": self.issuer,
                "clients": {self.client[0]: self.client[1]},
                "redirect_uris": [],  # only /auth/callback on the stand-in's own origin, as for ours
                "database_url": os.environ["STANDIN_DATABASE_URL"],
                "access_ttl": int(env("STANDIN_ACCESS_TOKEN_TTL", "3599")),
                "strict": env("STANDIN_STRICT", "").lower() in ("1", "true", "yes", "on"),
            }
        )
        app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {urlsplit(self.issuer).path: provider})
        self.http = requests.Session()
        self.http.mount(f"{self.issuer}/", WSGIAdapter(provider, self.issuer))

    def authorize_redirect(self, redirect_uri: str) -> Response:
        """Send the browser to the provider, keeping state and the PKCE verifier in the Flask session."""
        state, verifier = secrets.token_urlsafe(16), secrets.token_urlsafe(48)
        session["oauth"] = {"state": state, "verifier": verifier, "redirect_uri": redirect_uri}
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = {"client_id": self.client[0], "response_type": "code", "redirect_uri": redirect_uri, "scope": self.scopes, "state": state}
        query |= {"code_challenge": challenge, "code_challenge_method": "S256"}
        return redirect(f"{self.issuer}/authentication/v2/authorize?{urlencode(query)}")

    def authorize_access_token(self) -> dict | None:
        """Exchange the callback's code for tokens, with the person's userinfo under "userinfo"; None if refused."""
        started = session.pop("oauth", None)
        if not started or not request.args.get("code") or request.args.get("state") != started["state"]:
            return None
        form = {"grant_type": "authorization_code", "code": request.args["code"], "redirect_uri": started["redirect_uri"], "code_verifier": started["verifier"]}
        reply = self.http.post(self.token_url, data=form, auth=self.client, timeout=10)
        if reply.status_code != 200:
            return None
        tokens = reply.json()
        me = self.http.get(f"{self.issuer}/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}, timeout=10)
        return tokens | {"userinfo": me.json()}

    def refresh(self, refresh_token: str) -> dict | None:
        """Trade the refresh token for new tokens; None if the provider refuses it."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        reply = self.http.post(self.token_url, data=form, auth=self.client, timeout=10)
        return reply.json() if reply.status_code == 200 else None
