"""Peer P1: the sign-in most Flask apps have.

Flask-Login's user_loader reads the person's id from the signed Flask session cookie and loads them
with db.session.get; their tokens sit in Fernet-encrypted columns; an access token that has expired
is refreshed by the request that notices it: refresh, store, commit, no lock.

A sign-out clears this browser's cookie only: a copy of the cookie stays signed in.
"""

import os
import time
from datetime import UTC, datetime

from flask import Flask, abort, jsonify, redirect, url_for
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user, logout_user
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, mapped_column

from .shared import Encrypted, OAuthClient

db = SQLAlchemy()
login_manager = LoginManager()
LEEWAY = int(os.environ.get("TOKEN_REFRESH_LEEWAY", "60"))


class User(UserMixin, db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    email: Mapped[str] = mapped_column(String(255))
    access_token: Mapped[str] = mapped_column(Encrypted)
    refresh_token: Mapped[str] = mapped_column(Encrypted)
    expires_at: Mapped[int]  # epoch seconds, as Authlib's token models keep it

    def store(self, tokens: dict) -> None:
        self.access_token, self.refresh_token = tokens["access_token"], tokens["refresh_token"]
        self.expires_at = int(time.time()) + tokens["expires_in"]


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    return db.session.get(User, int(user_id))


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY=os.environ["SECRET_KEY"], SQLALCHEMY_DATABASE_URI=os.environ["DATABASE_URL"])
    app.config["SESSION_COOKIE_SECURE"] = os.environ.get("SESSION_COOKIE_SECURE", "true") == "true"
    db.init_app(app)
    login_manager.init_app(app)
    oauth = OAuthClient(app)

    def fresh(user: User) -> User:
        """Refresh the access token once it has expired: refresh, store the rotated tokens, commit."""
        if user.expires_at - LEEWAY > time.time():
            return user
        tokens = oauth.refresh(user.refresh_token)
        if tokens is None:
            logout_user()
            abort(401)  # the refresh token was refused: sign in again
        user.store(tokens)
        db.session.commit()
        return user

    @app.get("/auth/login")
    def login():
        return oauth.authorize_redirect(url_for("callback", _external=True))

    @app.get("/auth/callback")
    def callback():
        tokens = oauth.authorize_access_token()
        if tokens is None:
            abort(400)
        me = tokens["userinfo"]
        user = db.session.execute(select(User).filter_by(subject=me["sub"])).scalar_one_or_none() or User(subject=me["sub"])
        user.name, user.email = me["name"], me["email"]
        user.store(tokens)
        db.session.add(user)
        db.session.commit()
        login_user(user)
        return redirect("/")

    @app.post("/auth/logout")
    def logout():
        logout_user()
        return jsonify(signed_in=False)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/api/session")
    @login_required
    def api_session():
        user = fresh(current_user)
        expires = datetime.fromtimestamp(user.expires_at, UTC).isoformat()
        return jsonify(signed_in=True, user={"id": user.id, "name": user.name, "email": user.email}, access_token_expires_at=expires)

    @app.cli.command("init-db")
    def init_db():
        db.create_all()

    return app
