"""Peer P2: Flask-Login's request_loader over server-side sessions, the same job as ours.

The cookie holds a random id; request_loader finds its session row (by the id's hash), then the
person, so deleting the row signs that browser out at once. An expired access token is refreshed
by the request that notices it: refresh, store the rotated tokens, commit, no lock.
"""

import hashlib
import os
import secrets
import time
from datetime import UTC, datetime

from flask import Flask, abort, jsonify, redirect, request, url_for
from flask_login import LoginManager, UserMixin, current_user, login_required
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey, String, delete, select
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .shared import Encrypted, OAuthClient

db = SQLAlchemy()
login_manager = LoginManager()
LEEWAY = int(os.environ.get("TOKEN_REFRESH_LEEWAY", "60"))
COOKIE = "sid"
SESSION_LIFETIME = 15 * 24 * 3600  # as long as the refresh token lives


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


class UserSession(db.Model):
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey(User.id, ondelete="CASCADE"), index=True)
    expires_at: Mapped[int]
    user: Mapped[User] = relationship()


def id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@login_manager.request_loader
def load_user_from_request(request) -> User | None:
    session_id = request.cookies.get(COOKIE)
    row = db.session.get(UserSession, id_hash(session_id)) if session_id else None
    return row.user if row is not None and row.expires_at > time.time() else None


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
        session_id = secrets.token_urlsafe(32)
        db.session.add(UserSession(id_hash=id_hash(session_id), user=user, expires_at=int(time.time()) + SESSION_LIFETIME))
        db.session.commit()
        response = redirect("/")
        response.set_cookie(COOKIE, session_id, max_age=SESSION_LIFETIME, secure=app.config["SESSION_COOKIE_SECURE"], httponly=True, samesite="Lax")
        return response

    @app.post("/auth/logout")
    def logout():
        db.session.execute(delete(UserSession).where(UserSession.id_hash == id_hash(request.cookies.get(COOKIE, ""))))
        db.session.commit()
        response = jsonify(signed_in=False)
        response.delete_cookie(COOKIE)
        return response

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
