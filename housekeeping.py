"""Delete what no one can use any more: expired sessions, and people whose grant ended long ago."""

from dataclasses import dataclass
from datetime import datetime, timedelta

import click
from flask.cli import with_appcontext
from sqlalchemy import and_, delete, exists, func, select

from models import HandedToken, RefreshEvent, User, UserSession, db, utcnow
from sessions import RESUME_GRACE

# A person who comes back within this many days after their grant ended finds their history still there.
DEFAULT_GRACE_DAYS = 30
BATCH = 500


@dataclass(frozen=True)
class Purged:
    sessions: int
    people: int
    events: int


def purge_expired(now: datetime, grace: timedelta) -> Purged:
    """Delete sessions ended longer ago than RESUME_GRACE, then people without a live session whose grant ended before now - grace."""
    # Ended sessions stay a while, so their browsers can resume silently after a dead grant (sessions.RESUME_GRACE).
    sessions = db.session.execute(delete(UserSession).where(UserSession.expires_at <= now - RESUME_GRACE)).rowcount
    db.session.execute(delete(HandedToken).where(HandedToken.expires_at <= now))  # expired: nothing left to revoke
    db.session.commit()
    cutoff = now - grace
    # A dead or revoked grant clears refresh_expires_at, so then the last sign-in dates the person.
    grant_end = func.coalesce(User.refresh_expires_at, User.signed_in_at, User.created_at)
    live_session = exists().where(and_(UserSession.user_id == User.id, UserSession.expires_at > now))
    # Row locks make a sign-in racing with the purge wait for it (PostgreSQL; SQLite holds its write lock).
    stale = select(User.id).where(grant_end < cutoff, ~live_session).order_by(User.id).limit(BATCH).with_for_update()
    people = events = 0
    while ids := list(db.session.execute(stale).scalars()):
        # Children first and explicitly: the operator sees the counts, and nothing relies on ON DELETE CASCADE.
        events += db.session.execute(delete(RefreshEvent).where(RefreshEvent.user_id.in_(ids))).rowcount
        db.session.execute(delete(HandedToken).where(HandedToken.user_id.in_(ids)))
        db.session.execute(delete(UserSession).where(UserSession.user_id.in_(ids)))
        people += db.session.execute(delete(User).where(User.id.in_(ids))).rowcount
        db.session.commit()  # short transactions: sign-ins and refreshes are not held up for the whole purge
    return Purged(sessions=sessions, people=people, events=events)


@click.command("purge")
@click.option(
    "--grace-days",
    default=DEFAULT_GRACE_DAYS,
    show_default=True,
    type=click.IntRange(min=0),
    help="Keep a person this many days after their refresh token expired (or their last sign-in, once signed out).",
)
@with_appcontext
def purge(grace_days: int) -> None:
    """Delete expired sessions and people whose refresh token expired long ago, with their refresh events."""
    done = purge_expired(utcnow(), timedelta(days=grace_days))
    click.echo(f"Deleted {done.sessions} expired sessions, {done.people} people and {done.events} refresh events.")
