"""`moshi-ttt --help` (and `moshi-ttt bench --help`) list one clean line per command: the whole
first sentence of its help, on one line at 80 columns, never a summary cut where the docstring's
source line broke."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from moshi_ttt.cli import app


def _commands(group) -> dict[str, str]:
    """Command name -> its summary (the first paragraph of its help)."""
    return {name: (cmd.help or "").split("\n\n")[0] for name, cmd in group.commands.items()}


def _rows(help_text: str) -> list[str]:
    """The lines of the Commands panel, without its borders."""
    panel = help_text.split("Commands ─", 1)[1].split("╰", 1)[0]
    return [line.strip().strip("│").rstrip() for line in panel.splitlines()[1:] if "│" in line]


@pytest.mark.parametrize("args", [[], ["bench"]], ids=["moshi-ttt", "bench"])
def test_every_command_summary_is_one_whole_line(args):
    group = typer.main.get_command(app)
    for name in args:
        group = group.commands[name]
    summaries = _commands(group)
    assert summaries, "no commands found"
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"},
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    named = {}
    for row in rows:
        m = re.match(r"\s(\S+)\s+(.*)$", row)
        assert m and m[1] in summaries, f"a summary continues on another line: {row!r}\n" \
                                        f"{res.output}"
        named[m[1]] = m[2].strip()
    assert set(named) == set(summaries), res.output
    for name, summary in summaries.items():
        assert "\n" not in summary, f"{name}: summary spans lines: {summary!r}"
        assert summary.endswith("."), f"{name}: summary is not a whole sentence: {summary!r}"
        assert named[name] == summary, f"{name}: listed as {named[name]!r}, not {summary!r}"


def test_command_help_paragraphs_are_not_broken_at_source_lines():
    """A command's own --help: each paragraph is one line that rich wraps to the terminal, so no
    line ends mid-phrase just because the docstring's source line did."""
    group = typer.main.get_command(app)
    commands = {**group.commands, **{f"bench {n}": c
                                     for n, c in group.commands["bench"].commands.items()}}
    for name, cmd in commands.items():
        for paragraph in (cmd.help or "").split("\n\n"):
            assert "\n" not in paragraph, f"{name}: {paragraph!r}"
    res = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "80"},
                             catch_exceptions=False)
    assert res.exit_code == 0
    lines = [line.strip(" │") for line in res.output.splitlines()]
    assert "Run the offline job: data, base, training, serving, chat." in lines, res.output
    assert not any(line.endswith("and talk to") for line in lines), res.output
