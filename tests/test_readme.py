"""The README's commands are the interface users type: every `maac-robot` line in its shell blocks must parse with
the CLI as it is (subcommand, flags, `--set` keys), every script it runs must exist, and its Python blocks must
compile. What the commands *do* is tested where each command is (test_trainer, test_e2e, test_deploy, ...)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from maac_robot import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_BLOCK = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.M | re.S)


def _blocks(lang: str) -> list[str]:
    return [m["body"] for m in _BLOCK.finditer(README.read_text()) if m["lang"] == lang]


def _shell_lines() -> list[str]:
    """Each command of the README's bash blocks: continuations joined, comments and a trailing `&` dropped."""
    lines = []
    for body in _blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[-1] == "&":
                words = words[:-1]
            if words:
                lines.append(shlex.join(words))
    return lines


def _maac_robot_commands() -> list[list[str]]:
    out = []
    for line in _shell_lines():
        words = shlex.split(line)
        while words and words[0] in (".", "export") or (words and "=" in words[0] and not words[0].startswith("-")):
            words = words[2:] if words[0] == "." else words[1:]  # `. .venv/bin/activate && ...`, VAR=... prefixes
            if words and words[0] == "&&":
                words = words[1:]
        if words and words[0] == "maac-robot":
            out.append(words[1:])
    return out


COMMANDS = _maac_robot_commands()


def test_the_readme_documents_the_cli() -> None:
    assert len(COMMANDS) >= 20, "the README's shell blocks lost their maac-robot commands"
    documented = {argv[0] for argv in COMMANDS}
    assert documented >= {"train", "evaluate", "export", "inspect", "up", "sim", "control", "finetune", "keys"}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_every_readme_command_parses(argv: list[str]) -> None:
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's way of refusing: an unknown flag or subcommand
        pytest.fail(f"`maac-robot {shlex.join(argv)}` does not parse (exit {exit_.code})")
    from maac_robot.learn.config import parse_set

    parse_set(getattr(args, "set", None) or [])  # every --set key is a config key, typed as the config types it


def test_every_script_the_readme_runs_exists() -> None:
    scripts = [w for line in _shell_lines() for w in shlex.split(line) if w.startswith(("scripts/", "benchmarks/"))
               and w.endswith((".sh", ".py"))]
    assert scripts, "no scripts found in the README"
    for script in scripts:
        assert (ROOT / script).is_file(), script


def test_the_readme_python_compiles() -> None:
    blocks = _blocks("python")
    assert blocks
    for body in blocks:
        compile(body, "README.md", "exec")
