"""The command lines: `train` keeps the original options, stages fail early on bad params."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bestrq.params import hyperparameter_names
from stages.train import build_command

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_train_help_lists_every_hyperparameter():
    result = runner.invoke(build_command(REPO / "params.yaml"), ["--help"],
                           env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0
    for name in hyperparameter_names():
        assert f"--{name}" in result.output, name


def test_train_original_options_parse_and_reach_validation(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] = "not-a-model"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    result = runner.invoke(build_command(path), ["--batch_size", "4", "--num_codebooks", "16",
                                                 "--accumulate_gradients", "256"])
    # the options are accepted; the bad model from params.yaml stops it before any work
    assert result.exit_code == 2
    assert "model: 'not-a-model'" in result.output


def test_train_rejects_bad_value_before_work(tmp_path):
    result = runner.invoke(build_command(REPO / "params.yaml"),
                           ["--num_codebooks", "0", "--model", str(REPO / "params.yaml")])
    assert result.exit_code == 2
    assert "num_codebooks must be >= 1" in result.output


@pytest.mark.parametrize("key, value, message", [
    ("download.source", "missing", "download.source"),
    # A training parameter stops the first stage of a fresh `dvc repro`, before any download.
    ("num_codebooks", 0, "num_codebooks must be >= 1"),
    ("model", "tinyy", "model: 'tinyy'"),
])
def test_stage_with_bad_params_exits_before_work(tmp_path, key, value, message):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if key == "download.source":
        params["download"]["source"] = str(tmp_path / value)
    else:
        params[key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.download", "--params",
                           str(tmp_path / "params.yaml")], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was written
