"""The `train` command writes only in its own folder (never in DVC's outputs or the pipeline's
checkpoint folders), logs each run apart, and reads params.yaml as the stages do, for --help
too (issue 38, items 2 and 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_checkpoint_policy import project  # noqa: F401  (the module-scoped fixture)
from typer.testing import CliRunner

import stages.train
from stages.train import build_command

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    """A project folder with the repository's dvc.yaml and params.yaml, the pipeline's adapter
    and checkpoints in place, and a `run_pretrain` that records that it was called."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "data" / "adapters").mkdir(parents=True)
    (tmp_path / "data" / "adapters" / "adapter.safetensors").write_bytes(b"the pipeline's")
    (tmp_path / "data" / "checkpoints").mkdir()
    (tmp_path / "data" / "checkpoints" / "step-00000002.pt").write_bytes(b"its checkpoint")
    (tmp_path / "README.md").write_text("a file\n")
    monkeypatch.chdir(tmp_path)
    calls: list[dict] = []

    def run_pretrain(p, **kw):
        calls.append(kw)
        kw["checkpoint_dir"].mkdir(parents=True)  # as the recipe does when it starts

    monkeypatch.setattr(stages.train, "run_pretrain", run_pretrain)
    return tmp_path, calls


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("output_dir, says", [
    ("data/adapters", "is DVC's output data/adapters (stage pretrain of dvc.yaml)"),
    ("data/adapters/", "is DVC's output data/adapters (stage pretrain of dvc.yaml)"),
    ("runs/../data/adapters/sub", "is inside DVC's output data/adapters (stage pretrain"),
    ("dvclive/pretrain/plots/metrics", "is DVC's output dvclive/pretrain/plots/metrics"),
    ("data", "holds DVC's output data/params.checked (stage check of dvc.yaml)"),
    ("dvclive", "holds DVC's output dvclive/download/metrics.json (stage download"),
    (".", "holds DVC's output data/params.checked"),
    ("data/checkpoints", "is the pipeline's checkpoint folder data/checkpoints"),
    ("data/finetune_checkpoints/x", "is inside the pipeline's checkpoint folder "
                                    "data/finetune_checkpoints"),
    ("README.md", "is a file, not a folder"),
    ("README.md/run", "README.md is a file, not a folder"),
])
def test_train_refuses_dvc_outputs_checkpoint_folders_and_files_before_any_work(
        pipeline, output_dir, says):
    root, calls = pipeline
    before = files(root)
    result = runner.invoke(build_command(root / "params.yaml"),
                           ["--output_dir", output_dir, "--max_steps", "2"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error (train): --output_dir {output_dir} ")
    assert says in result.output
    assert result.output.count("\n") == 1  # one line, no traceback
    assert calls == []  # nothing trained...
    assert files(root) == before  # ...and nothing written, moved or removed
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "data", "dvc.yaml",
                                                      "params.yaml"]


def test_train_takes_a_folder_outside_the_outputs_and_names_runs(pipeline, tmp_path_factory):
    root, calls = pipeline
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "run"
    for args in (["--output_dir", str(elsewhere)], ["--output_dir", "data/mine"], [],
                 ["--name", "lr-5e-5"], []):
        result = runner.invoke(build_command(root / "params.yaml"), args)
        assert result.exit_code == 0, result.output
    # Each run's adapter, checkpoints and DVCLive log in one folder: a path outside DVC's
    # outputs as given; otherwise runs/train/<name>, the next free run-N unless named.
    outs = [call["adapter_path"].parent for call in calls]
    assert outs == [elsewhere, Path("data/mine"), Path("runs/train/run-1"),
                    Path("runs/train/lr-5e-5"), Path("runs/train/run-2")]
    for call, out in zip(calls, outs, strict=True):
        assert call["checkpoint_dir"] == out / "checkpoints"
        assert Path(call["live_name"]) == (out / "dvclive").resolve()
    assert "train: run-2 in runs/train/run-2 (--name run-2 continues it)" in result.output


@pytest.mark.parametrize("args, says", [
    (["--name", "a/b"], "--name 'a/b': a run's name is one folder name, such as lr-5e-5"),
    (["--name", ".."], "--name '..': a run's name is one folder name, such as lr-5e-5"),
    (["--name", "x", "--output_dir", "y"], "give --name or --output_dir, not both"),
])
def test_train_refuses_a_bad_name_in_one_line(pipeline, args, says):
    root, calls = pipeline
    result = runner.invoke(build_command(root / "params.yaml"), args)
    assert result.exit_code == 2 and calls == []
    assert result.output == f"error (train): {says}\n"


def test_two_train_runs_keep_their_own_logs(project, tmp_path, monkeypatch):  # noqa: F811
    from test_checkpoint_policy import train_cli

    monkeypatch.chdir(tmp_path)
    assert train_cli(project, tmp_path / "one", "--max_steps", "2").exit_code == 0
    first = files(tmp_path / "one" / "dvclive")
    assert json.loads(first["metrics.json"])["steps"] == 2
    assert train_cli(project, tmp_path / "two", "--max_steps", "1").exit_code == 0
    # The second run wiped nothing of the first's log; its own has its own step count.
    assert files(tmp_path / "one" / "dvclive") == first
    second = files(tmp_path / "two" / "dvclive")
    assert json.loads(second["metrics.json"])["steps"] == 1
    curve = "plots/metrics/train/loss.tsv"
    assert [r.split("\t")[0] for r in first[curve].decode().splitlines()] == ["step", "1", "2"]
    assert [r.split("\t")[0] for r in second[curve].decode().splitlines()] == ["step", "1"]
    assert not (tmp_path / "dvclive").exists()


# 8^7 = 2 M items from one line: the anchors inside the value (keys beside it would be
# unknown parameters, refused on lines of their own).
BOMB = "[&a [x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{c} [{', '.join([f'*{p}'] * 8)}]" for p, c in zip("abcdef", "bcdefg", strict=True)) + "]"


@pytest.mark.parametrize("content, says", [
    ((REPO / "params.yaml").read_text().replace("num_codebooks: 1", f"num_codebooks: {BOMB}"),
     "params.yaml: num_codebooks: must be an integer in [1, 64], got [['x', 'x', 'x', 'x', "
     "...], [[...], [...], [...], [...], ...], [[...], [...], [...], [...], ...], [[...], "
     "[...], [...], [...], ...], ...]"),
    (b"seed: 0\nmodel: caf\xe9\n", "params.yaml: not UTF-8 text: 'utf-8' codec can't decode "
                                   "byte 0xe9"),
])

def test_train_reads_params_as_the_stages_do_for_help_too(tmp_path, monkeypatch, content,
                                                          says):
    params = tmp_path / "params.yaml"
    if isinstance(content, str):
        content = content.encode()
    params.write_bytes(content)
    monkeypatch.chdir(tmp_path)
    # --help still works (it reads no more than a stage's --help needs): the declared
    # defaults, and one line saying why params.yaml's are not shown.
    result = runner.invoke(build_command(params), ["--help"],
                           env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    assert len(result.output) < 20_000  # no value built by aliases is expanded
    warning = [line for line in result.output.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and warning[0].startswith("warning (train): ")
    assert says in warning[0] and warning[0].endswith("; --help shows the declared defaults")
    options = " ".join(result.output.split("Options:")[1].split())
    assert "(params.yaml:" not in options
    codebooks = options.split("--num-codebooks <int>")[1].split(" --")[0]
    assert codebooks.endswith("(declared default: 1)")
    # A run refuses the file in the stages' one line, before any work.
    result = runner.invoke(build_command(params), ["--max_steps", "1"])
    assert result.exit_code == 2
    assert result.output.startswith("error (pretrain): ") and says in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "runs").exists()
