"""Re-encrypt the stored tokens with the newest key, so an old key can be retired.

Rotation: put a new key first in TOKEN_ENCRYPTION_KEYS (keep the old ones after it), deploy,
run `flask --app app rotate-token-keys`, then remove the old keys.
"""

import click
from cryptography.fernet import InvalidToken
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import Text, delete, select, type_coerce, update

from models import HandedToken, User, db

TOKEN_COLUMNS = ("refresh_token", "access_token", "viewer_token", "viewer_refresh_token")


def rotate_all() -> tuple[int, int]:
    """Re-encrypt every person's tokens with the first key; return (people rotated, people unreadable)."""
    cipher = current_app.extensions["token_cipher"]
    # type_coerce to Text reads and writes the ciphertext itself, past EncryptedText's decryption.
    columns = [type_coerce(getattr(User, name), Text).label(name) for name in TOKEN_COLUMNS]
    rows = db.session.execute(select(User.id, *columns)).all()
    db.session.commit()
    rotated = unreadable = 0
    for row in rows:
        old = {name: getattr(row, name) for name in TOKEN_COLUMNS}
        try:
            new = {name: cipher.rotate(value.encode()).decode() if value else value for name, value in old.items()}
        except InvalidToken:
            unreadable += 1
            continue
        # Compare-and-swap: a refresh that stored a new token since we read it wins, and that one
        # is already encrypted with the newest key (the app encrypts with the first key).
        unchanged = [getattr(User, name).is_not_distinct_from(type_coerce(value, Text)) for name, value in old.items()]
        values = {name: type_coerce(value, Text) for name, value in new.items()}
        db.session.execute(update(User).where(User.id == row.id, *unchanged).values(**values), execution_options={"synchronize_session": False})
        db.session.commit()
        rotated += 1
    _rotate_handed_tokens(cipher)
    return rotated, unreadable


def _rotate_handed_tokens(cipher) -> None:
    """Re-encrypt the access tokens kept for revocation at sign-out; one no key can read is dropped (it expires within the hour anyway)."""
    token = type_coerce(HandedToken.token, Text)
    for row in db.session.execute(select(HandedToken.id, token.label("token"))).all():
        try:
            db.session.execute(update(HandedToken).where(HandedToken.id == row.id).values(token=type_coerce(cipher.rotate(row.token.encode()).decode(), Text)))
        except InvalidToken:
            db.session.execute(delete(HandedToken).where(HandedToken.id == row.id))
    db.session.commit()


@click.command("rotate-token-keys")
@with_appcontext
def rotate_token_keys() -> None:
    """Re-encrypt every stored token with the first key of TOKEN_ENCRYPTION_KEYS."""
    rotated, unreadable = rotate_all()
    click.echo(f"Re-encrypted the stored tokens of {rotated} {'person' if rotated == 1 else 'people'} with the newest key.")
    if unreadable:
        # Leave them as they are: the key that wrote them is missing from the ring, and putting it back fixes them.
        who = "person" if unreadable == 1 else "people"
        click.echo(f"The tokens of {unreadable} {who} could not be decrypted with any configured key and were left as they are;", err=True)
        click.echo("add the key that encrypted them to TOKEN_ENCRYPTION_KEYS and run this again.", err=True)
        raise SystemExit(1)
    click.echo("Once every instance runs with the new key first, the old keys can be removed.")
