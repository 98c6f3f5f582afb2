"""The people who sign in, their browser sessions and the history of their refreshes."""

from datetime import UTC, datetime

from flask import current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text, TypeDecorator, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Store timezone-aware UTC datetimes, also on SQLite which forgets the zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use timezone-aware UTC")
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class EncryptedText(TypeDecorator):
    """Encrypt a token with the app's key ring on write and decrypt it on read."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        return current_app.extensions["token_cipher"].encrypt(value.encode()).decode()

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return current_app.extensions["token_cipher"].decrypt(value.encode()).decode()


class User(db.Model):
    """A person, keyed by the provider's subject, with their one current refresh token.

    The provider keeps one refresh token per person per app, so every browser session of the
    person shares the tokens stored here.
    """

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    email: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # The tokens load (and decrypt) only when a request uses one: knowing who is signed in needs none of them.
    refresh_token: Mapped[str | None] = mapped_column(EncryptedText, deferred=True, deferred_group="tokens")
    refresh_issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    refresh_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    refresh_rotations: Mapped[int] = mapped_column(Integer, default=0)
    signed_in_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    access_token: Mapped[str | None] = mapped_column(EncryptedText, deferred=True, deferred_group="tokens")
    access_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    viewer_token: Mapped[str | None] = mapped_column(EncryptedText, deferred=True, deferred_group="tokens")
    viewer_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    viewer_scope: Mapped[str | None] = mapped_column(String(255))
    # The refresh token a provider issues with the viewer's own authorization (OAUTH_VIEWER_TOKEN=authorize), never
    # used: kept only to be revoked when the next one replaces it and at sign-out (viewer_authorization.py).
    viewer_refresh_token: Mapped[str | None] = mapped_column(EncryptedText, deferred=True, deferred_group="tokens")
    # A refresh was sent but its reply never came: the provider may have rotated the stored token.
    refresh_unsure: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    sessions: Mapped[list["UserSession"]] = relationship(back_populates="user", cascade="all, delete-orphan", passive_deletes=True)

    def clear_tokens(self) -> None:
        """Forget every token of this person (the refresh token is dead or revoked)."""
        self.refresh_token = self.access_token = self.viewer_token = self.viewer_refresh_token = None
        self.refresh_expires_at = self.access_expires_at = self.viewer_expires_at = None
        self.refresh_unsure = False


class UserSession(db.Model):
    """A signed-in browser; the cookie holds the id, the table only its SHA-256 hash."""

    __tablename__ = "user_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    user_agent: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The expiry this browser's cookie was last given, so the cookie can follow expires_at.
    cookie_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The provider's session id (the ID token's sid), so its back-channel logout can end just this session.
    provider_sid: Mapped[str | None] = mapped_column(String(255), index=True)

    user: Mapped[User] = relationship(back_populates="sessions")


class RefreshEvent(db.Model):
    """One refresh attempt at the provider, kept so the person can see the lifecycle."""

    __tablename__ = "refresh_events"
    # Every request's hook reads the person's latest access refresh (sessions._by_id_hash): one index
    # lookup, however long their history. Its first column serves the lookups by person too.
    __table_args__ = (Index("ix_refresh_events_user_id_kind_id", "user_id", "kind", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # "access" or "viewer"
    outcome: Mapped[str] = mapped_column(String(32))  # an events.Outcome
    # The provider's error when it refused the refresh (invalid_scope...).
    cause: Mapped[str | None] = mapped_column(String(64))
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    trigger: Mapped[str] = mapped_column(String(255), default="")
    # Requests that waited for this refresh and then used its result, as the refresher counted them
    # (PostgreSQL; 0 on SQLite, where waiters queue for the database write lock unseen).
    waiters: Mapped[int] = mapped_column(Integer, default=0)


class HandedToken(db.Model):
    """An access token that left the person's row while alive: handed to a browser's viewer, or replaced by a newer one.

    Kept until it expires, so a sign-out can revoke what is still out there (grants.end_sessions).
    """

    __tablename__ = "handed_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # The session (device) it was handed to; None for a token the server alone held.
    session_hash: Mapped[str | None] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64))  # SHA-256, to find one token handed to several devices
    token: Mapped[str] = mapped_column(EncryptedText)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class SeenLogoutToken(db.Model):
    """A back-channel logout token already acted on, kept until it would be refused as too old anyway."""

    __tablename__ = "seen_logout_tokens"

    # SHA-256 of the issuer and the token's jti: a replayed token is refused (OIDC Back-Channel Logout 1.0 §2.6).
    jti_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
