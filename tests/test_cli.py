"""The command line: version, help, exit codes, unbuilt commands."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from fapecli import __version__
from fapecli.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fape {__version__}"


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fapecli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"fape {__version__}"


def test_every_command_has_help() -> None:
    for command in ("plan", "restore", "score", "train", "degrade", "weights"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_weights_list_json() -> None:
    import json

    result = runner.invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    names = {r["name"] for r in records}
    assert "fape-s" in names
    assert set(records[0]) >= {"name", "kind", "present", "path", "licence"}
