"""The README's commands work as written, pasted into a fresh shell with no virtual environment activated."""

import re

from servers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Installed only into .venv: in a fresh shell these names are missing, or are another Python's.
VENV_ONLY = ("flask", "gunicorn", "python", "pip", "pytest", "ruff", "uv", "alembic", "playwright")
BARE = re.compile(rf"(?:^|&&|\|\||;|\||\$\(|\bexec\s)\s*({'|'.join(VENV_ONLY)})(?=\s|$)", re.M)


def code_in(markdown: str) -> list[str]:
    """Return the text of every fenced block, indented block and inline code span."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    indented = ["\n".join(line[4:] for line in block.splitlines()) for block in re.findall(r"(?:^(?:    |\t)\S.*\n?)+", rest, re.M)]
    rest = re.sub(r"(?:^(?:    |\t)\S.*\n?)+", "", rest, flags=re.M)
    inline = re.findall(r"`([^`\n]+)`", rest)
    return fenced + indented + inline


def test_commands_name_the_virtual_environments_tools():
    """`flask --app app purge` fails in a fresh shell (no Flask-Migrate in the global flask): write .venv/bin/flask."""
    bare = [f"{doc.name}: {code.strip()}" for doc in DOCS for code in code_in(doc.read_text()) if BARE.search(code)]
    assert not bare, "\n".join(bare)
