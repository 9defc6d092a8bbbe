"""The lowbit command: --version, --help, demo (text and --json), one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

import lowbit
from lowbit.cli import COMMANDS, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lowbit {lowbit.__version__}"


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: lowbit" in out
    assert all(name in out for name in COMMANDS)


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "required" in capsys.readouterr().err


def test_every_command_accepts_json(capsys):
    for name in COMMANDS:
        assert main([name, "--help"]) == 0
        assert "--json" in capsys.readouterr().out


def test_demo_json_is_one_object(capsys):
    assert main(["demo", "--preset", "bnn", "--batches", "1", "--batch-size", "2", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)  # raises if anything else is on stdout
    assert data["preset"] == "bnn" and data["calibration_batches"] == 1
    layers = data["summary"]["layers"]
    assert [row["weight_bits"] for row in layers] == [8, 1, 1, 8]  # first and last kept at 8 bits
    total = data["summary"]["total"]
    assert total["bytes"] == sum(row["bytes"] for row in layers) + data["summary"]["other"]["bytes"]
    assert total["compression"] == pytest.approx(total["float_bytes"] / total["bytes"])


def test_demo_prints_the_table(capsys):
    assert main(["demo", "--batches", "1", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["layer", "type"]
    assert "compression" in out and "preset w8a8" in out


def test_bad_preset_is_one_line_and_status_2(capsys):
    assert main(["demo", "--preset", "w9a9"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit demo: error: unknown preset 'w9a9'; presets: w8a8")


def test_bad_preset_with_json_still_prints_one_object(capsys):
    assert main(["demo", "--preset", "w9a9", "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["type"] == "ConfigError"
    assert len(captured.err.splitlines()) == 1


def test_subprocess_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "lowbit", "demo", "--preset", "nope"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "unknown preset 'nope'" in done.stderr
    assert "Traceback" not in done.stderr
