"""The command lines: `train` keeps the original options, stages fail early on bad params."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bestrq.params import hyperparameter_names, load_params
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


def test_train_rejects_bad_value_before_work(tmp_path, random_checkpoint):
    result = runner.invoke(build_command(REPO / "params.yaml"),
                           ["--num_codebooks", "0", "--model", str(random_checkpoint)])
    assert result.exit_code == 2
    assert "command line: num_codebooks: must be an integer in [1, 64], got 0" in result.output


def test_train_takes_a_list_option_as_yaml(monkeypatch):
    import stages.train

    seen = {}
    monkeypatch.setattr(stages.train, "run_pretrain", lambda p, **kw: seen.update(p=p))
    result = runner.invoke(build_command(REPO / "params.yaml"),
                           ["--distill_layers", "[-2, -1]", "--bestrq_layer", "-3"])
    assert result.exit_code == 0, result.output
    assert seen["p"].loss.distill_layers == [-2, -1] and seen["p"].loss.bestrq_layer == -3
    result = runner.invoke(build_command(REPO / "params.yaml"), ["--distill_layers", "[a"])
    assert result.exit_code == 2 and "distill_layers: must be a non-empty list" in result.output


@pytest.mark.parametrize("value", ["2.5", "true", "abc"])
def test_train_integer_option_rejects_other_types_naming_it(value):
    result = runner.invoke(build_command(REPO / "params.yaml"), ["--batch_size", value])
    assert result.exit_code == 2
    assert "--batch_size" in result.output


@pytest.mark.parametrize("module, key, value, message", [
    ("download", "download.source", "missing", "download.source"),
    # A training parameter stops the check stage, the first of a fresh `dvc repro`, before any
    # download (a data stage reads only its own sections).
    ("check", "num_codebooks", 0, "num_codebooks: must be an integer in [1, 64], got 0"),
    ("check", "model", "tinyy", "model: 'tinyy'"),
])
def test_stage_with_bad_params_exits_before_work(tmp_path, module, key, value, message):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if key == "download.source":
        params["download"]["source"] = str(tmp_path / value)
    else:
        params[key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", f"stages.{module}", "--params",
                           str(tmp_path / "params.yaml")], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was written


# ----------------------------------------------------------------------------- wrong types

BAD_VALUES = [
    # key, value, message: every Python type confusion, in every section
    ("num_codebooks", "abc", "num_codebooks: must be an integer in [1, 64], got 'abc'"),
    ("mask_prob", "0.5", "mask_prob: must be a number in (0, 1], got '0.5'"),
    ("download", [1, 2], "download: must be a mapping of download parameters, got [1, 2]"),
    ("batch_size", 2.5, "batch_size: must be an integer in [1, 65536], got 2.5"),
    ("batch_size", True, "batch_size: must be an integer in [1, 65536], got True"),
    ("max_steps", 1.5, "max_steps: must be an integer in [1, 1000000000], got 1.5"),
    ("codebook_size", 10**12, "codebook_size: must be an integer in [1, 1048576], got "
                              "1000000000000"),
    ("learning_rate", True, "learning_rate: must be a number in (0, 10], got True"),
    ("model", 3, "model: must be a non-empty string, got 3"),
    ("lr_schedule", "linear", "lr_schedule: must be one of inverse_sqrt, cosine, constant, "
                              "got 'linear'"),
    ("distill_weight", float("nan"), "distill_weight: must be a number in [0, 1000000], "
                                     "got nan"),
    ("seed", {"a": 1}, "seed: must be an integer in [0, 9223372036854775807], got {'a': 1}"),
    ("nproc", None, "nproc: must be an integer in [1, 1024], got None"),
    ("download.num_utterances", "400", "download.num_utterances: must be an integer in "
                                       "[1, 10000000], got '400'"),
    ("download.source", ["a"], "download.source: must be a non-empty string, got ['a']"),
    ("segment.pack", 1, "segment.pack: must be true or false, got 1"),
    ("segment.max_seconds", "long", "segment.max_seconds: must be a number in (0, 30], "
                                    "got 'long'"),
    ("features.batch_size", 16.0, "features.batch_size: must be an integer in [1, 65536], "
                                  "got 16.0"),
    ("features.dtype", "int8", "features.dtype: must be one of float16, float32, got 'int8'"),
    ("evaluate.asr", "yes", "evaluate.asr: must be true or false, got 'yes'"),
    ("evaluate.seed", -1, "evaluate.seed: must be an integer in [0, 9223372036854775807], "
                          "got -1"),
    ("evaluate", "all", "evaluate: must be a mapping of evaluate parameters, got 'all'"),
    ("finetune.max_minutes", True, "finetune.max_minutes: must be a number in [0, 100000000], "
                                   "got True"),
    ("finetune.max_step", 3, "unknown parameter finetune.max_step (did you mean max_steps?)"),
]


def write_params(folder: Path, key: str, value) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section, _, name = key.rpartition(".")
    (params[section] if section else params)[name] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def invoke_stage(stage: str, params: Path):
    from importlib import import_module

    return runner.invoke(import_module(f"stages.{stage}").app, ["--params", str(params)])


@pytest.mark.parametrize("key, value, message", BAD_VALUES)
def test_wrong_type_stops_the_first_stage_naming_the_key(tmp_path, monkeypatch, key, value,
                                                         message):
    monkeypatch.chdir(tmp_path)
    result = invoke_stage("check", write_params(tmp_path, key, value))
    assert result.exit_code == 2
    assert f"error (check): params.yaml: {message}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no work done


@pytest.mark.parametrize("stage, key, value, message", [
    ("check", "finetune.batch_size", 2.5, "finetune.batch_size: must be an integer"),
    ("check", "download.num_speakers", True, "download.num_speakers: must be an integer"),
    ("pretrain", "segment.dev_fraction", "0.2", "segment.dev_fraction: must be a number"),
    ("evaluate", "features.shard_size", "big", "features.shard_size: must be an integer"),
    ("finetune", "evaluate.bootstrap_samples", 99.5, "evaluate.bootstrap_samples: must be an "
                                                     "integer in [100, 10000000]"),
])
def test_every_stage_checks_every_section(tmp_path, monkeypatch, stage, key, value, message):
    """The check stage and the training stages, which read the whole file."""
    monkeypatch.chdir(tmp_path)
    result = invoke_stage(stage, write_params(tmp_path, key, value))
    assert result.exit_code == 2
    assert f"error ({stage}): params.yaml: {message}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("stage, own, others", [
    ("download", ("download.num_speakers", True, "download.num_speakers: must be an integer"),
     [("num_codebooks", 0), ("model", "tinyy"), ("segment.pack", 1), ("features.dtype", 3)]),
    ("segment", ("segment.eval_fraction", 0.2, "unknown parameter segment.eval_fraction"),
     [("finetune.batch_size", 2.5), ("n_mels", "80"), ("download", "all")]),
    ("features", ("n_mels", 81, "params.yaml: n_mels: must be one of 80, 128, got 81"),
     [("download.num_speakers", True), ("learning_rate", -1.0), ("evaluate.asr", "yes")]),
])
def test_a_data_stage_checks_only_what_it_reads(tmp_path, monkeypatch, stage, own, others):
    """A data stage refuses a bad value of its own in one line before any work, and leaves the
    other stages' keys to them (the check stage refuses those before any data stage runs)."""
    from importlib import import_module

    monkeypatch.chdir(tmp_path)
    key, value, message = own
    result = invoke_stage(stage, write_params(tmp_path, key, value))
    assert result.exit_code == 2
    assert f"error ({stage}): " in result.output and message in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    read = import_module(f"stages.{stage}").read_params
    for key, value in others:
        read(str(write_params(tmp_path, key, value)))  # not its concern: no error
        with pytest.raises(ValueError, match=re.escape(key)):
            load_params(write_params(tmp_path, key, value))  # the check stage's reader


def test_every_bad_key_is_reported_at_once(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(batch_size=2.5, mask_prob="0.5")
    params["segment"]["pack"] = "no"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = invoke_stage("check", tmp_path / "params.yaml")
    assert result.exit_code == 2
    for key in ("batch_size", "mask_prob", "segment.pack"):
        assert f"params.yaml: {key}: must be" in result.output


# ----------------------------------------------------------------------------- --traceback


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_traceback_option_shows_the_traceback_of_a_bad_parameter(tmp_path):
    params = write_params(tmp_path, "num_codebooks", "abc")
    plain = run_module("stages.check", "--params", str(params), cwd=tmp_path)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    traced = run_module("stages.check", "--params", str(params), "--traceback", cwd=tmp_path)
    assert "No such option" not in traced.stderr
    assert traced.returncode == 1
    assert "Traceback (most recent call last)" in traced.stderr
    assert "ValueError: params.yaml: num_codebooks: must be an integer" in traced.stderr


def test_traceback_option_shows_the_traceback_of_a_stage_failure(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    plain = run_module("stages.pretrain", cwd=tmp_path)  # no features: a friendly error
    assert plain.returncode == 1
    assert "no training features" in plain.stderr and "Traceback" not in plain.stderr
    traced = run_module("stages.pretrain", "--traceback", cwd=tmp_path)
    assert traced.returncode == 1
    assert "Traceback (most recent call last)" in traced.stderr
    assert "FileNotFoundError: no training features" in traced.stderr


def test_traceback_option_works_on_train(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    traced = run_module("stages.train", "--traceback", "--features_dir", "nowhere",
                        cwd=tmp_path)
    assert traced.returncode == 1
    assert "FileNotFoundError: no training features in nowhere/train" in traced.stderr
