"""The lowbit command: --version, --help, --json everywhere, one-line errors with exit status 2."""

import json
import subprocess
import sys


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


def test_bad_preset_is_one_line_and_status_2(capsys, tmp_path):
    assert main(["quantize", "lenet5", "--preset", "w9a9", "--out", str(tmp_path / "m.lowbit")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit quantize: error: unknown preset 'w9a9'; presets: w8a8")
    assert not (tmp_path / "m.lowbit").exists()


def test_bad_preset_with_json_still_prints_one_object(capsys, tmp_path):
    assert main(["quantize", "lenet5", "--preset", "w9a9", "--out", str(tmp_path / "m.lowbit"), "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["type"] == "ConfigError"
    assert len(captured.err.splitlines()) == 1


def test_subprocess_module_entry_point(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lowbit", "quantize", "lenet5", "--preset", "nope", "--out", str(tmp_path / "m.lowbit")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "unknown preset 'nope'" in done.stderr
    assert "Traceback" not in done.stderr
