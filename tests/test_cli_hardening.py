"""Bad options and inputs of the lowbit command: one line on stderr (one JSON object under --json), exit 2,
never a traceback, and no work done before the check."""

import json
import os

import numpy as np
import pytest
import torch

import lowbit
from lowbit import cli
from lowbit.cli import main
from lowbit.models import get_model
from test_cli_workflow import run_error as error_line  # one stderr line, status 2, nothing on stdout

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def json_error(capsys, argv):
    """The error object of a command that must fail with status 2 under --json (stdout: one JSON object)."""
    status = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert status == 2, captured
    assert len(captured.out.splitlines()) == 1 and len(captured.err.splitlines()) == 1
    return json.loads(captured.out)["error"]


@pytest.fixture
def lowbit_file(tmp_path):
    torch.manual_seed(0)
    model = lowbit.quantize(get_model("lenet5"), "w8a8")
    lowbit.calibrate(model, [torch.randn(8, 1, 28, 28)])
    path = tmp_path / "m.lowbit"
    lowbit.save(model.eval(), path, example_input=torch.zeros(1, 1, 28, 28))
    return path


# ---------------------------------------------------------------------------------------- output paths


def bad_outputs(tmp_path):
    """(--out value, the reason the check gives) for a file output."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain").write_text("x")
    return {
        "directory": (str(tmp_path / "folder"), f"{str(tmp_path / 'folder')!r} is a directory; give a file path"),
        "empty": ("", "is empty; give a file path"),
        "under a file": (str(tmp_path / "plain" / "m.out"),
                         f"{str(tmp_path / 'plain' / 'm.out')!r} lies under {str(tmp_path / 'plain')!r}, which is a "
                         "file, not a folder"),
    }


# every subcommand that writes a file, with a source that does not exist: the --out check must come first
FILE_WRITERS = {
    "quantize": ["quantize", "lenet5", "--calib-batches", "1"],
    "export": ["export", "missing.lowbit"],
    "allocate": ["allocate", "missing", "--budget-kb", "10"],
    "compress": ["compress", "missing", "--data", "digits"],
}


@pytest.mark.parametrize("command", FILE_WRITERS)
@pytest.mark.parametrize("kind", ["directory", "empty", "under a file"])
def test_bad_out_file_is_one_line_before_any_work(tmp_path, capsys, command, kind):
    out, reason = bad_outputs(tmp_path)[kind]
    line = error_line(capsys, [*FILE_WRITERS[command], "--out", out])
    assert line == f"lowbit {command}: error: --out {reason}"
    error = json_error(capsys, [*FILE_WRITERS[command], "--out", out])
    assert error["type"] == "ConfigError" and error["message"].startswith("--out")


def test_unwritable_out_folder_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder, even for root
    line = error_line(capsys, ["quantize", "lenet5", "--out", str(tmp_path / "new" / "m.lowbit")])
    assert line == (f"lowbit quantize: error: --out {str(tmp_path / 'new' / 'm.lowbit')!r}: folder {str(tmp_path)!r} "
                    "is not writable (permission denied)")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert "is not writable" in error_line(capsys, ["quantize", "lenet5", "--out", str(folder / "m.lowbit")])
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("argv", [
    ["train", "--model", "nope", "--data", "digits", "--epochs", "1"],
    ["train", "--recipe", "nope", "--data", "digits"],
    ["demo", "--data", "nope"],
])
def test_directory_outputs_are_checked_first(tmp_path, capsys, argv):
    (tmp_path / "plain").write_text("x")
    command = argv[0]
    line = error_line(capsys, [*argv, "--out", str(tmp_path / "plain")])
    assert line == f"lowbit {command}: error: --out {str(tmp_path / 'plain')!r} is a file; give a directory"
    line = error_line(capsys, [*argv, "--out", str(tmp_path / "plain" / "run")])
    assert line.endswith(f"lies under {str(tmp_path / 'plain')!r}, which is a file, not a folder")
    assert error_line(capsys, [*argv, "--out", ""]) == f"lowbit {command}: error: --out is empty; give a directory path"


def test_allocate_checks_table_and_plot_too(tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    argv = ["allocate", "missing", "--budget-kb", "10", "--out", str(tmp_path / "c.json")]
    line = error_line(capsys, [*argv, "--table", str(tmp_path / "plain" / "t.json")])
    assert line.startswith(f"lowbit allocate: error: --table {str(tmp_path / 'plain' / 't.json')!r} lies under")
    line = error_line(capsys, [*argv, "--plot", str(tmp_path / "bits.txt")])
    assert "unknown image type '.txt'; use .png (or" in line
    assert not (tmp_path / "c.json").exists()


def test_compress_plots_must_be_a_directory(tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    line = error_line(capsys, [*FILE_WRITERS["compress"], "--out", str(tmp_path / "m.lowbit"),
                               "--plots", str(tmp_path / "plain")])
    assert line == f"lowbit compress: error: --plots {str(tmp_path / 'plain')!r} is a file; give a directory"


# ---------------------------------------------------------------------------------------------- plots


def test_inspect_plot_into_a_directory_reports_the_file_it_wrote(tmp_path, capsys, lowbit_file):
    folder = tmp_path / "plots"
    folder.mkdir()
    assert main(["inspect", str(lowbit_file), "--plot", str(folder), "--json"]) == 0
    written = folder / "m-cost.png"
    assert json.loads(capsys.readouterr().out)["plot"] == str(written)
    assert written.read_bytes()[:8] == PNG_MAGIC
    assert main(["inspect", str(lowbit_file), "--plot", str(tmp_path / "cost")]) == 0  # no suffix: .png added
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'cost.png'}"
    assert (tmp_path / "cost.png").read_bytes()[:8] == PNG_MAGIC and not (tmp_path / "cost").exists()
    assert main(["inspect", str(lowbit_file), "--plot", str(tmp_path / "new") + os.sep]) == 0  # a folder to make
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'new' / 'm-cost.png'}"


def test_bad_plot_paths_are_one_line(tmp_path, capsys, lowbit_file):
    (tmp_path / "plain").write_text("x")
    line = error_line(capsys, ["inspect", str(lowbit_file), "--plot", str(tmp_path / "plain" / "c.png")])
    assert line == (f"lowbit inspect: error: --plot {str(tmp_path / 'plain' / 'c.png')!r} lies under "
                    f"{str(tmp_path / 'plain')!r}, which is a file, not a folder")
    line = error_line(capsys, ["inspect", str(lowbit_file), "--plot", str(tmp_path / "c.txt")])
    assert line.startswith(f"lowbit inspect: error: plot file {str(tmp_path / 'c.txt')!r} has an unknown image type "
                           "'.txt'; use .png (or ")
    assert error_line(capsys, ["inspect", str(lowbit_file), "--plot", ""]) == \
        "lowbit inspect: error: --plot is empty; give a file path"
    error = json_error(capsys, ["inspect", str(lowbit_file), "--plot", str(tmp_path / "plain" / "c.png")])
    assert error["type"] == "ConfigError" and "which is a file" in error["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lowbit", "plain"]


def test_plot_file_and_save_figure():
    from lowbit.analysis.plots import plot_file
    from lowbit.errors import ConfigError

    assert str(plot_file("a/cost")) == os.path.join("a", "cost.png")
    assert str(plot_file("cost.svg")) == "cost.svg"
    with pytest.raises(ConfigError, match="unknown image type '.lowbit'"):
        plot_file("model.lowbit")


# ------------------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize("argv, message", [
    (["quantize", "lenet5", "--out", "m.lowbit", "--bogus"], "unrecognized arguments: --bogus"),
    (["quantize", "lenet5", "--out", "m.lowbit", "--calib-batches", "x"],
     "argument --calib-batches: invalid int value: 'x'"),
    (["eval", "m.lowbit", "--limit", "1.5"], "argument --limit: invalid int value: '1.5'"),
    (["quantize", "lenet5"], "the following arguments are required: --out"),
    (["quantize", "lenet5", "--out", "m", "--entropy", "zip"], "argument --entropy: invalid choice: 'zip'"),
    (["nope"], "argument command: invalid choice: 'nope'"),
])
def test_usage_errors_under_json_are_one_object(capsys, argv, message):
    status = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert status == 2
    error = json.loads(captured.out)["error"]
    assert error["type"] == "UsageError" and error["code"] == "usage" and error["message"].startswith(message)
    assert len(captured.err.splitlines()) == 1 and "usage:" not in captured.err
    assert main(argv) == 2  # without --json: argparse's usage text and error line, as before
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: lowbit") and message in captured.err


# --------------------------------------------------------------------------------------- option values


def test_run_rejects_a_negative_limit_as_eval_does(capsys, lowbit_file):
    expected = "error: limit must be a positive integer, got -1"
    assert error_line(capsys, ["eval", str(lowbit_file), "--limit", "-1"]) == f"lowbit eval: {expected}"
    assert error_line(capsys, ["run", str(lowbit_file), "--limit", "-1"]) == f"lowbit run: {expected}"
    assert error_line(capsys, ["run", str(lowbit_file), "--batch-size", "0"]) == \
        "lowbit run: error: --batch-size must be a positive integer, got 0"


@pytest.mark.parametrize("option, message", [
    (["--sparsity", "1.5"], "sparsity must be a finite number from 0 to 1, got 1.5"),
    (["--sparsity", "-0.5"], "sparsity must be a finite number from 0 to 1, got -0.5"),
    (["--sparsity", "ip1=2"], "sparsity of layer 'ip1' must be a finite number from 0 to 1, got 2.0"),
    (["--quality", "nan"], "quality must be a finite number >= 0, got nan"),
    (["--index-bits", "0"], "index_bits must be an integer from 1 to 16, got 0"),
    (["--index-bits", "ip1=17"], "index_bits of layer 'ip1' must be an integer from 1 to 16, got 17"),
    (["--bits", "9"], "bits must be an integer from 1 to 8, got 9"),
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
])
def test_compress_rejects_bad_values_before_reading_anything(tmp_path, capsys, option, message):
    # the checkpoint does not exist: the options are checked before it is read and before any training
    line = error_line(capsys, [*FILE_WRITERS["compress"], "--out", str(tmp_path / "m.lowbit"), *option])
    assert line == f"lowbit compress: error: {message}" and "j)" not in line


@pytest.mark.parametrize("option, message", [
    (["--budget-kb", "-5"], "--budget-kb must be a finite number of kB > 0, got -5.0"),
    (["--budget-kb", "inf"], "--budget-kb must be a finite number of kB > 0, got inf"),
    (["--max-drop", "nan"], "--max-drop must be from 0 to 100 (percentage points), got nan"),
    (["--match-bits", "5"], "--match-bits 5 is not one of --bits 1 2 3 4 6 8"),
    (["--budget-kb", "9", "--act-budget-kb", "0"], "--act-budget-kb must be a finite number of kB > 0, got 0.0"),
])
def test_allocate_checks_its_budget_before_measuring(tmp_path, capsys, option, message):
    line = error_line(capsys, ["allocate", "missing", "--out", str(tmp_path / "c.json"), *option])
    assert line == f"lowbit allocate: error: {message}"


@pytest.mark.parametrize("option, message", [
    (["--bits", "7"], "unknown preset 'linear7'"),
    (["--calib-batches", "0"], "calibration batches must be a positive integer, got 0"),
])
def test_demo_checks_its_options_before_training(tmp_path, capsys, option, message):
    line = error_line(capsys, ["demo", "--data", "nope", "--out", str(tmp_path / "demo"), *option])
    assert line.startswith(f"lowbit demo: error: {message}")
    assert not (tmp_path / "demo").exists()


def test_deep_compression_api_checks_its_options():
    from lowbit.compress import DeepCompressionConfig, deep_compress, sparsity_schedule
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="sparsity must be a finite number from 0 to 1, got 1.5"):
        sparsity_schedule(1.5, 3)  # (1 - 1.5) ** (1 / 3) would be a complex number
    with pytest.raises(ConfigError, match="finetune_lr"):
        DeepCompressionConfig(finetune_lr=-1.0)
    with pytest.raises(ConfigError, match="unknown k-means init"):
        DeepCompressionConfig(init="kmeans++")
    with pytest.raises(ConfigError, match=r"index_bits names unknown layer\(s\) \['fc9'\]"):
        deep_compress(get_model("lenet300"), [], [], DeepCompressionConfig(index_bits={"fc9": 4}))


@pytest.mark.parametrize("option, message", [
    (["--lr", "-1"], "lr must be > 0 and finite, got -1.0"),
    (["--lr", "inf"], "lr must be > 0 and finite, got inf"),
    (["--recipe", "bwn", "--lr", "-1"], "lr must be > 0 and finite, got -1.0"),
    (["--recipe", "bwn", "--limit", "-1"], "limit must be a positive integer, got -1"),
])
def test_train_with_a_rejected_option_makes_no_directory(tmp_path, capsys, option, message):
    out = tmp_path / "run"
    argv = ["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert error_line(capsys, [*argv, *option]) == f"lowbit train: error: {message}"
    assert not out.exists()


def test_quantize_a_static_preset_without_calibration(tmp_path, capsys):
    out = tmp_path / "m.lowbit"
    line = error_line(capsys, ["quantize", "lenet5", "--preset", "w8a8", "--calib-batches", "0", "--out", str(out)])
    assert line == ("lowbit quantize: error: preset 'w8a8' quantizes conv1.input, conv2.input, ip1.input, ip2.input "
                    "with static ranges, which need calibration batches: --calib-batches must be >= 1")
    assert not out.exists()
    error = json_error(capsys, ["quantize", "lenet5", "--calib-batches", "0", "--out", str(out)])
    assert error["type"] == "CalibrationError"


# ---------------------------------------------------------------------------------------- JSON and text


@pytest.mark.parametrize("value", ["Infinity", "NaN", "-1", "1e7", "1e400"])
def test_energy_table_values_are_checked_and_json_stays_strict(tmp_path, capsys, lowbit_file, value):
    table = tmp_path / "energy.json"
    table.write_text(f'{{"dram_read_32bit": {value}}}')
    status = main(["inspect", str(lowbit_file), "--energy-table", str(table), "--json"])
    out = capsys.readouterr().out
    assert status == 2
    error = json.loads(out, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))["error"]
    assert error["message"].startswith("energy table entry 'dram_read_32bit' must be a number of pJ from 0 to 1e+06")


def test_a_non_finite_result_is_an_error_not_invalid_json(capsys, monkeypatch):
    def run(args):
        return cli.Output("text", {"rows": [{"loss": 1.0}, {"loss": float("nan")}]})

    monkeypatch.setitem(cli.COMMANDS, "eval", cli.Command("eval", cli.COMMANDS["eval"].add_arguments, run))
    error = json_error(capsys, ["eval", "m.lowbit"])
    assert error["message"].startswith("the result's rows[1].loss is nan, which JSON cannot hold")
    assert main(["eval", "m.lowbit"]) == 0 and capsys.readouterr().out == "text\n"  # text can show it


def test_a_failed_file_access_is_one_line(capsys, monkeypatch):
    def run(args):
        raise PermissionError(13, "Permission denied", "/x/m.lowbit")

    monkeypatch.setitem(cli.COMMANDS, "eval", cli.Command("eval", cli.COMMANDS["eval"].add_arguments, run))
    assert error_line(capsys, ["eval", "m.lowbit"]) == "lowbit eval: error: '/x/m.lowbit': Permission denied"


def test_tensor_names_with_unpaired_surrogates_are_escaped(tmp_path, capsys):
    from lowbit.format.container import raw, write_file

    path = tmp_path / "odd.lowbit"
    write_file(path, {"\udcff": raw(np.zeros(3, np.float32)), "ok": raw(np.ones(2, np.float32))})
    assert main(["inspect", str(path)]) == 0  # capsys encodes strictly as UTF-8, as a UTF-8 terminal does
    assert "\\udcff" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")  # no unpaired surrogate left, not even as a \ud... escape
    assert "\\ud" not in out.replace("\\\\udcff", "")
    assert [t["name"] for t in json.loads(out)["tensors"]] == ["ok", "\\udcff"]
