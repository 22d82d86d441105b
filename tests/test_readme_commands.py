"""Every command line the README shows parses through the real argparse parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from featcircuits.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
# placeholders of the synopsis -> values of the right type
PLACEHOLDERS = {"DIR": "runs/x", "T": "sva-simple", "M": "gemma-3-270m-offline", "N": "1000", "X": "0.1",
                "Y": "0.01"}


def _blocks(section: str) -> list[str]:
    """The fenced code blocks of a README section (``## section`` up to the next ``## ``)."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else None]
    return re.findall(r"```[a-z]*\n(.*?)```", body, flags=re.S)


def _commands(block: str) -> list[str]:
    """``featcircuits ...`` commands of a block: continuation lines joined, comments dropped,
    ``&&`` chains split, the leading ``.venv/bin/`` removed."""
    lines: list[str] = []
    for raw in block.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if raw[:1].isspace() and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line.strip())
    out = []
    for line in lines:
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith(".venv/bin/featcircuits"):
                part = part[len(".venv/bin/"):]
            if part.startswith("featcircuits "):
                out.append(part[len("featcircuits "):])
    return out


def _variants(synopsis: str) -> list[list[str]]:
    """Argument lists a synopsis allows: the required part, then each optional ``[...]``
    alternative added to it; every ``a|b|c`` value is tried in turn."""
    groups = re.findall(r"\[([^\]]*)\]", synopsis)
    base = re.sub(r"\[[^\]]*\]", " ", synopsis)
    options = [""] + [alt.strip() for g in groups for alt in re.split(r"\s\|\s", g)]
    out = []
    for extra in options:
        tokens = shlex.split(f"{base} {extra}")
        tokens = [PLACEHOLDERS.get(t, t) for t in tokens]
        alts = [i for i, t in enumerate(tokens) if "|" in t]
        picks = [[t.split("|")[0] if "|" in t else t for t in tokens]]
        for i in alts:
            for choice in tokens[i].split("|")[1:]:
                picks.append([*picks[0][:i], choice, *picks[0][i + 1:]])
        out += picks
    return out


COMMANDS = [c for section in ("Quick start", "Command line") for b in _blocks(section) for c in _commands(b)]


def test_readme_shows_commands():
    assert {c.split()[0] for c in COMMANDS} >= {"info", "discover", "export", "evaluate", "curves", "agreement",
                                                "train-saes"}


@pytest.mark.parametrize("synopsis", COMMANDS, ids=[c.split()[0] for c in COMMANDS])
def test_readme_command_parses(synopsis):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    if synopsis.split()[0] not in sub.choices:
        pytest.fail(f"the README shows an unknown subcommand: {synopsis}")
    for argv in _variants(synopsis):
        args = parser.parse_args(argv)  # argparse exits (SystemExit) on anything it rejects
        assert args.command == argv[0] and callable(args.func)
