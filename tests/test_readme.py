"""The README's test command is exactly what CI runs (the brief requires the two to agree)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", text, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, f"README.md must hold exactly two set-up commands; found {len(cmds)}"


def test_ci_runs_the_readme_test_command():
    test_cmd = _readme_commands()[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci, f"README test command {test_cmd!r} is not what .ci/run executes"
