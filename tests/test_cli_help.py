"""`--help` of every command and sub-command: it exits 0, its description is whole (ends a
sentence) and every option and argument says what it is for.

In process, through darkmatter.cli.main: each parser that prints its help is caught on the way
(ArgumentParser.print_help), so the checks read the parser itself, not its formatted text.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from darkmatter import cli

COMMANDS = [
    [], ["prepare"], ["index"], ["pretrain"], ["evaluate"], ["export"],
    ["runs"], ["runs", "list"], ["runs", "show"], ["runs", "compare"],
    ["stack"], ["stack", "up"], ["stack", "down"], ["stack", "status"],
]  # fmt: skip


@pytest.fixture
def printed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[list[argparse.ArgumentParser]]:
    """The parsers whose help was printed, in order; the environment is restored afterwards
    (main fills in defaults, and would point at a developer's running stack)."""
    saved = dict(os.environ)
    monkeypatch.setenv("DARKMATTER_STACK_DIR", str(tmp_path / "no-stack"))
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help

    def record(self: argparse.ArgumentParser, file=None) -> None:  # type: ignore[no-untyped-def]
        seen.append(self)
        original(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    yield seen
    os.environ.clear()
    os.environ.update(saved)


def run_help(argv: list[str]) -> int:
    try:
        code = cli.main([*argv, "--help"])
    except SystemExit as e:
        code = int(e.code or 0)
    return code


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Options, arguments and sub-commands of `parser` without a help text."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: (c.help or "").strip() for c in action._choices_actions}
            missing += [name for name in action.choices if not helps.get(name)]
        elif action.help != argparse.SUPPRESS and not (action.help or "").strip():
            missing.append("/".join(action.option_strings) or action.dest)
    return missing


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "darkmatter")
def test_help_is_complete(argv: list[str], printed: list[argparse.ArgumentParser],
                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert run_help(argv) == 0
    out = capsys.readouterr().out
    assert len(printed) == 1, [p.prog for p in printed]
    parser = printed[0]
    assert parser.prog == " ".join(["darkmatter", *argv])
    description = (parser.description or "").strip()
    assert description, f"{parser.prog}: no description"
    assert description[-1] in ".):", (
        f"{parser.prog}: description ends mid-sentence: …{description[-60:]!r}"
    )
    # The description shown is the whole of it (argparse may reflow, never cut).
    assert " ".join(description.split()[-6:]) in " ".join(out.split())
    assert undocumented(parser) == [], f"{parser.prog}: no help text"


def test_undocumented_finds_what_it_should() -> None:
    """The check above can fail: an option, an argument and a sub-command without help."""
    p = argparse.ArgumentParser(prog="x", description="X.")
    p.add_argument("--bare")
    p.add_argument("--told", help="has one")
    p.add_argument("thing")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("quiet")
    sub.add_parser("loud", help="has one")
    assert undocumented(p) == ["--bare", "thing", "quiet"]


def test_debug_flag_is_taken_before_and_after_the_command() -> None:
    assert cli._take_debug(["--debug", "export", "a", "b"]) == (["export", "a", "b"], True)
    assert cli._take_debug(["export", "a", "--debug", "b"]) == (["export", "a", "b"], True)
    assert cli._take_debug(["export", "a"]) == (["export", "a"], False)
    # After `--` it is an argument like any other.
    assert cli._take_debug(["runs", "--", "--debug"]) == (["runs", "--", "--debug"], False)
