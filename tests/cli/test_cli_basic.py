"""CLI: methods, estimate, and one-line errors with a non-zero exit."""
import json
import subprocess
import sys

import pytest

from compresskit.cli.main import main


def run(capsys, *argv):
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_estimate_reproduces_the_supplementary_worked_example(capsys):
    code, out, _ = run(capsys, "estimate", "--shape", "6912x1152", "--method", "pq", "--bits", "2", "--json")
    assert code == 0
    result = json.loads(out)
    # DPQ supplementary, section 1: the 6912 x 1152 AdaLN layer at 2 bits
    assert result["parts_bits"] == {"codes": 15_925_248, "pool": 1_990_656, "projection": 1_179_648}
    assert result["total_bits"] == 15_925_248 + 1_990_656 + 1_179_648
    assert result["params"]["k"] == 256
    # "the compressed codebook and the projection matrix is less than one-fourth of the compressed weights"
    assert result["parts_bits"]["pool"] + result["parts_bits"]["projection"] < result["parts_bits"]["codes"] / 4


def test_estimate_table_and_other_methods(capsys):
    code, out, _ = run(capsys, "estimate", "--shape", "4096x4096", "--method", "rtn", "--bits", "4", "--param", "group_size=128")
    assert code == 0 and "scales" in out and "4.2500" in out


def test_methods_lists_every_quantizer_with_defaults(capsys):
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0
    table = json.loads(out)
    assert {"rtn", "vq", "pq"} <= set(table)
    assert table["pq"]["params"]["k"] == 256 and table["pq"]["params"]["tau_c"] == 0.05


@pytest.mark.parametrize(
    "argv, message",
    [
        (["estimate", "--shape", "6912x1152", "--method", "nope"], "unknown method 'nope'"),
        (["estimate", "--shape", "6912x1152", "--method", "pq", "--bits", "7"], "bits must be one of 1, 2, 3, 4"),
        (["estimate", "--shape", "6912by1152"], "--shape"),
        (["estimate", "--shape", "8x8", "--param", "nonsense"], "NAME=VALUE"),
        (["estimate", "--shape", "8x8", "--param", "colour=3"], "unknown parameter"),
        (["info", "/nonexistent/dir"], "not a compresskit model directory"),
        (["eval", "--bogus"], "No such option: --bogus"),  # click usage errors: one line too
        (["quantize", "--bits"], "requires an argument"),
        (["eval"], "Missing argument"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["estimate", "eval", "info"])
def test_calibration_options_only_on_quantize(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "--calib-set" not in out and "--preset" not in out


def test_console_script_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "compresskit", "estimate", "--shape", "8x8", "--method", "pq", "--bits", "9"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr


def test_methods_table_keeps_bracketed_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    from compresskit.cli import output
    from rich.console import Console

    monkeypatch.setattr(output, "console", Console(width=250))
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "[in, in]" in out  # rich markup would have eaten the shape
