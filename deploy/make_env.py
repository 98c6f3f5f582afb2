"""Write .env from .env.example with fresh secrets: SECRET_KEY, TOKEN_ENCRYPTION_KEYS, POSTGRES_PASSWORD.

    python3 deploy/make_env.py            # writes .env next to docker-compose.yml
    python3 deploy/make_env.py other.env  # writes elsewhere

Only the standard library, so it runs before anything is installed. It never overwrites a file.
"""

import base64
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fresh_secrets() -> dict[str, str]:
    return {
        "SECRET_KEY": secrets.token_hex(32),
        # A Fernet key is 32 random bytes in URL-safe base64, exactly what Fernet.generate_key() returns.
        "TOKEN_ENCRYPTION_KEYS": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
    }


def render(example: str, values: dict[str, str]) -> str:
    """Fill the empty NAME= lines of the example with values."""
    lines = []
    for line in example.splitlines():
        name = line.partition("=")[0]
        if line == f"{name}=" and name in values:
            line = f"{name}={values[name]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    target = Path(argv[1]) if len(argv) > 1 else ROOT / ".env"
    if target.exists():
        print(f"{target} exists already; not overwriting it.", file=sys.stderr)
        return 1
    target.write_text(render((ROOT / ".env.example").read_text(), fresh_secrets()))
    target.chmod(0o600)
    print(f"Wrote {target} with fresh secrets.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
