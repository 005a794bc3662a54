"""End to end: `dvc repro`, then `dvc exp run -S num_codebooks=16`, then `dvc exp show --json`,
in a temporary git repository holding a copy of the project."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper, save_whisper_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

PROJECT_FILES = ["bestrq", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config",
                 ".dvc/plots", ".dvcignore", ".gitignore"]
ALL_STAGES = ("download", "segment", "features", "stock_eval", "stock_finetune", "pretrain",
              "evaluate", "finetune", "report")
STOCK_STAGES = ("stock_eval", "stock_finetune")  # no BEST-RQ knob re-runs them


def run(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1",
           **(extra_env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}"
    return output


def make_project(tmp_path: Path, model: str, overrides: dict) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        src = REPO / name
        dst = project / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"] = model
    for key, value in overrides.items():
        if isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], project)
    return project


def ran_stages(output: str) -> set[str]:
    return {s for s in ALL_STAGES if f"Running stage '{s}'" in output}


SMALL = {
    "download": {"num_utterances": 24, "num_speakers": 3},
    "segment": {"dev_fraction": 0.3, "test_fraction": 0.3},  # a voice each
    # One window a micro-batch, two an update: train holds a single window here, and a
    # micro-batch larger than the training split is refused (issue 38 item 8).
    "codebook_size": 256, "max_steps": 2, "warmup_steps": 1, "batch_size": 1,
    "accumulate_gradients": 2, "checkpoint_every": 1, "num_workers": 0,
    "finetune": {"batch_size": 1, "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 1},
}


def test_repro_then_experiment_with_16_codebooks(tmp_path):
    # A short model name, as `tiny.en` is: `dvc exp show` gives the first parameter's column
    # the width of its value. The checkpoint lies in the project, ignored by git (/*.pt).
    # Two fine-tune seeds: each seed's difference and one pooled over both.
    project = make_project(tmp_path, "w.pt", {**SMALL, "finetune": {**SMALL["finetune"],
                                                                    "seeds": [0, 1]}})
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), project / "w.pt")

    first = run(["dvc", "repro"], project)
    assert ran_stages(first) == set(ALL_STAGES)
    adapter = project / "data" / "adapters" / "adapter.safetensors"
    info = json.loads(adapter.with_suffix(".json").read_text())
    assert info["quantizer"]["num_codebooks"] == 1 and info["step"] == 2
    both = json.loads((project / "dvclive" / "evaluate" / "metrics.json").read_text())
    assert set(both) == {"test", "dev"}  # every figure on both held-out splits
    evaluation = both["test"]
    assert {"adapted", "stock", "delta", "prior"} <= set(evaluation) <= set(both["dev"])
    assert 0.0 < evaluation["adapted"]["mask_fraction"] < 1.0
    assert "wer" in evaluation["adapted"] and "wer" in evaluation["stock"]
    assert evaluation["delta"]["wer_low"] <= evaluation["delta"]["wer"] <= \
        evaluation["delta"]["wer_high"]
    # Intervals resample the eval speakers; the table shows each window's errors.
    from bestrq.dataset import FeatureDataset
    groups = FeatureDataset(project / "data" / "features" / "test").groups
    assert None not in groups and evaluation["asr_speakers"] == len(set(groups)) >= 1
    dev_groups = FeatureDataset(project / "data" / "features" / "dev").groups
    train_groups = FeatureDataset(project / "data" / "features" / "train").groups
    assert not set(groups) & set(dev_groups) and not set(train_groups) & set(groups + dev_groups)
    windows = json.loads((project / "dvclive" / "evaluate" / "windows.json").read_text())
    assert {w["split"] for w in windows} == {"test", "dev"}
    windows = [w for w in windows if w["split"] == "test"]
    assert len(windows) == evaluation["asr_clips"]
    assert {w["speaker"] for w in windows} <= set(groups)
    assert sum(w["stock_errors"] for w in windows) == evaluation["stock"]["substitutions"] + \
        evaluation["stock"]["deletions"] + evaluation["stock"]["insertions"]
    # Both fine-tunes ran on the same labelled clips and are compared with an interval.
    stage = json.loads((project / "dvclive" / "finetune" / "metrics.json").read_text())
    assert stage["labelled_clips"] >= 1 and stage["steps"] == 2
    finetuned = stage["test"]
    assert {"stock", "adapted", "delta"} <= set(stage["dev"])
    assert finetuned["delta"]["wer_low"] <= finetuned["delta"]["wer"] <= \
        finetuned["delta"]["wer_high"]
    assert finetuned["delta"]["wer"] == pytest.approx(
        finetuned["adapted"]["wer"] - finetuned["stock"]["wer"])
    assert {"seed_0", "seed_1"} <= set(finetuned) and finetuned["seeds"] == 2
    for start in ("stock", "adapted"):
        for seed, folder in ((0, ""), (1, "seed-1")):
            vectors = project / "data" / "finetune" / start / folder / "adapter-only.safetensors"
            made = json.loads(vectors.with_suffix(".json").read_text())
            assert (made["start"], made["seed"], made["step"]) == (start, seed, 2)
    # The stock baselines' stages: what they wrote, to be left as it is by the experiment.
    stock_outputs = {**file_digests(project / "data" / "finetune" / "stock"),
                     **{f"{s}/{name}": hashlib.sha256((project / "dvclive" / s / name)
                                                      .read_bytes()).hexdigest()
                        for s in STOCK_STAGES for name in ("metrics.json", "windows.json")}}
    baseline = json.loads((project / "dvclive" / "report" / "metrics.json").read_text())

    # Record the baseline as a commit, as a user would, so that it lists its own metrics.
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], project)
    manifest = project / "data" / "raw" / "manifest.jsonl"
    before = manifest.stat().st_mtime_ns
    second = run(["dvc", "exp", "run", "-S", "num_codebooks=16"], project)
    # The stock baselines depend on no BEST-RQ knob: DVC skips them, and only pre-training,
    # the adapted evaluation, the fine-tune from the adapter and the report run.
    assert ran_stages(second) == {"pretrain", "evaluate", "finetune", "report"}, second[-3000:]
    for stage in STOCK_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second, second[-3000:]
    assert manifest.stat().st_mtime_ns == before
    assert "No file hash info found" not in second and "WARNING" not in second, second[-3000:]
    assert {**file_digests(project / "data" / "finetune" / "stock"),
            **{f"{s}/{name}": hashlib.sha256((project / "dvclive" / s / name).read_bytes())
               .hexdigest() for s in STOCK_STAGES for name in ("metrics.json", "windows.json")}
            } == stock_outputs
    # The experiment's report compares the new adapter with the same stock systems.
    answer = json.loads((project / "dvclive" / "report" / "metrics.json").read_text())
    for split in ("test", "dev"):
        for name in ("stock", "ft_stock"):
            assert answer[split][name] == baseline[split][name]
            assert answer[split]["wer_low"][name] == baseline[split]["wer_low"][name]
        assert {"bestrq", "ft_bestrq", "zs_diff", "ft_diff", "ft_diff_seed_0",
                "ft_diff_seed_1"} <= set(answer[split])

    shown = run(["dvc", "exp", "show", "--json"], project)
    payload = json.loads(shown[shown.find("["):])
    codebooks = set()
    for data in exp_metrics_from(payload):
        metrics = data["metrics"]
        # The report's answer is the only DVC metrics file: nothing else crowds the table.
        assert set(metrics) <= {"dvclive/report/metrics.json"}
        if not metrics:
            continue
        params = data["params"]["params.yaml"]["data"]
        report = metrics["dvclive/report/metrics.json"]["data"]
        assert list(report)[:2] == ["test", "dev"]
        for answer in (report["test"], report["dev"]):
            systems = {"stock", "bestrq", "ft_stock", "ft_bestrq"}
            for group in ("wer_low", "wer_high", "sub", "del", "ins"):
                assert set(answer[group]) == systems, group
            numbers = {k for k, v in answer.items() if not isinstance(v, dict)}
            assert {k for k in numbers if "seed" not in k} == systems | {
                "zs_diff", "zs_low", "zs_high", "ft_diff", "ft_low", "ft_high"}
            assert answer["ft_diff"] == pytest.approx(
                answer["ft_bestrq"] - answer["ft_stock"], abs=0.011)
            assert {"loss", "prior_loss"} <= set(answer["heldout"])
        assert "train_loss" in report["bestrq"]
        seeds = params["finetune"]["seeds"]
        assert sorted(k for k in report["test"] if "seed" in k) == (
            [f"ft_diff_seed_{s}" for s in seeds] if len(seeds) > 1 else [])
        codebooks.add(params["num_codebooks"])
    assert {1, 16} <= codebooks, shown[:4000]

    # A plain `dvc exp show` opens with the answer: its pager shows the table 1,024 characters
    # wide, and the first 200 (a 200-column terminal's first screen) hold the ten numbers.
    table = run(["dvc", "exp", "show"], project, {"DVC_PAGER": "cat", "COLUMNS": "200"})
    header = next(line for line in table.splitlines() if "Experiment" in line)
    assert header[:200].split()[:12] == [
        "Experiment", "Created", "test.stock", "test.bestrq", "test.ft_stock", "test.ft_bestrq",
        "test.zs_diff", "test.zs_low", "test.zs_high", "test.ft_diff", "test.ft_low",
        "test.ft_high"], table[:3000]
    row = next(line for line in table.splitlines() if "[" in line and "└──" in line)
    assert all(c.replace(".", "").replace("-", "").isdigit() for c in row[:200].split()[5:15])


def exp_metrics_from(payload) -> list[dict]:
    found: list[dict] = []

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "metrics" in data and "params" in data:
                found.append(data)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(payload)
    return found


def test_repro_on_real_tiny_en(tmp_path, tiny_en_path):
    overrides = {**SMALL, "max_steps": 1}
    project = make_project(tmp_path, str(tiny_en_path), overrides)
    out = run(["dvc", "repro"], project)
    assert ran_stages(out) == set(ALL_STAGES)
    info = json.loads((project / "data" / "adapters" / "adapter.json").read_text())
    assert info["adapter_parameters"] == 9216
    assert info["base"]["dims"]["n_audio_state"] == 384
    # The vectors-only adapter is 9,216 fp32 numbers plus its JSON description.
    vectors = project / "data" / "adapters" / "adapter-only.safetensors"
    assert 9216 * 4 < vectors.stat().st_size < 9216 * 4 + 16_384
    pretrain = json.loads((project / "dvclive" / "pretrain" / "metrics.json").read_text())
    assert pretrain["adapter_file_kb"] == pytest.approx(vectors.stat().st_size / 1024)
    evaluation = json.loads((project / "dvclive" / "evaluate" / "metrics.json").read_text())["test"]
    # The label prior is the baseline to beat, and it is far below a uniform guess.
    assert evaluation["prior"]["loss"] < math.log(256) - 0.5
    assert math.isfinite(evaluation["delta"]["loss_vs_prior"])
    # tiny.en reads the synthetic speech; its WER is reported beside the adapted model's
    assert evaluation["asr_clips"] >= 1 and evaluation["stock"]["reference_words"] > 20
    assert evaluation["stock"]["wer"] < 0.5
    assert evaluation["delta"]["wer"] == pytest.approx(
        evaluation["adapted"]["wer"] - evaluation["stock"]["wer"])
    finetuned = json.loads((project / "dvclive" / "finetune" / "metrics.json").read_text())["test"]
    assert finetuned["stock"]["wer"] < 0.5 and finetuned["adapted"]["wer"] < 0.5
    assert finetuned["delta"]["wer_low"] <= finetuned["delta"]["wer"] <= \
        finetuned["delta"]["wer_high"]


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by its relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def adapter_digests(project: Path) -> dict[str, str]:
    return file_digests(project / "data" / "adapters")


def test_repro_finishes_when_train_keeps_no_transcript(tmp_path):
    # Every train transcript hidden: the fine-tune has nothing to train on. It used to print
    # "skipped" and leave its declared plots folder unmade, so `dvc repro` failed before the
    # report; now every stage runs and the report names the absent figures and why.
    overrides = {**SMALL, "segment": {**SMALL["segment"], "transcribed_share": 0.0},
                 "evaluate": {"probes": False}}
    project = make_project(tmp_path, "w.pt", overrides)
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), project / "w.pt")
    out = run(["dvc", "repro"], project)
    assert ran_stages(out) == set(ALL_STAGES)
    stage = json.loads((project / "dvclive" / "finetune" / "metrics.json").read_text())
    assert stage["labelled_clips"] == 0 and "no transcribed clips" in stage["skipped"]
    record = json.loads((project / "dvclive" / "report" / "run.json").read_text())
    assert [line.split(" (")[0] for line in record["absent"]] == ["ft_stock", "ft_bestrq"]
    assert all("no transcribed clips" in line for line in record["absent"])
    answer = json.loads((project / "dvclive" / "report" / "metrics.json").read_text())
    assert {"stock", "bestrq", "zs_diff"} <= set(answer["test"]) and \
        "ft_stock" not in answer["test"]
    assert "report: ft_stock (fine-tuned from stock) on test, dev: absent" in out


@pytest.mark.parametrize("layout", ["by role", "one folder"])
def test_the_users_case_fine_tunes_from_both_starts_and_reports_test_and_dev(tmp_path, layout):
    # The user's case: untranscribed speakers and a few transcribed ones, LibriSpeech-layout
    # folders under one watched folder; by role (a labelled set, dev and test sets of their
    # own) or as one folder split by shares (the transcribed speakers used to go all to dev
    # and test, and the fine-tune failed the pipeline).
    from tests.test_roles import _librispeech

    data = tmp_path / "corpus"
    if layout == "by role":
        _librispeech(data / "pool", [1, 2, 3, 4], text=False)
        _librispeech(data / "labelled", [11, 12])
        _librispeech(data / "dev", [21])
        _librispeech(data / "test", [31])
        download = {"source": str(data / "pool"), "labelled": str(data / "labelled"),
                    "dev": str(data / "dev"), "test": str(data / "test")}
    else:
        _librispeech(data / "all", [1, 2, 3, 4], text=False)
        _librispeech(data / "all", [11, 12, 21, 31])
        download = {"source": str(data / "all")}
    project = make_project(tmp_path, "w.pt", {
        **SMALL, "download": {**download, "watch": str(data)},
        "segment": {"transcribed_share": 1.0}, "evaluate": {"probes": False}})
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), project / "w.pt")
    out = run(["dvc", "repro"], project)
    assert ran_stages(out) == set(ALL_STAGES)
    segments = json.loads((project / "dvclive" / "segment" / "metrics.json").read_text())
    assert segments["speakers_train"] == 6 and segments["transcribed_train"] == 2
    assert segments["transcribed_test"] >= 1 and segments["transcribed_dev"] >= 1
    if layout == "by role":
        assert (segments["speakers_test"], segments["speakers_dev"]) == (1, 1)
    stage = json.loads((project / "dvclive" / "finetune" / "metrics.json").read_text())
    assert stage["labelled_clips"] >= 1
    answer = json.loads((project / "dvclive" / "report" / "metrics.json").read_text())
    for split in ("test", "dev"):
        assert {"stock", "bestrq", "ft_stock", "ft_bestrq", "ft_diff"} <= set(answer[split])


def test_download_stage_is_bitwise_reproducible(tmp_path):
    # Many voices and speakers: every voice variant the synthetic source uses is covered.
    project = make_project(tmp_path, "tiny.en", {"download": {"num_utterances": 40,
                                                              "num_speakers": 20}})
    runs = []
    for _ in range(2):
        run([sys.executable, "-m", "stages.download"], project)
        runs.append(file_digests(project / "data" / "raw"))
    assert runs[0] == runs[1]
    assert "manifest.jsonl" in runs[0]
    assert sum(name.endswith(".flac") for name in runs[0]) == 40


def read_steps(tsv: Path) -> list[int]:
    rows = tsv.read_text().splitlines()[1:]
    return [int(r.split("\t")[0]) for r in rows if r]


def test_killed_pretrain_resumes_and_history_continues(tmp_path):
    ckpt = tmp_path / "random-whisper.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), ckpt)
    overrides = {**SMALL, "max_steps": 4, "checkpoint_every": 2, "batch_size": 1}
    project = make_project(tmp_path, str(ckpt), overrides)
    env_kill = {"BESTRQ_CHECKPOINT_KILL": "4:written"}  # SIGKILL inside the last checkpoint
    proc = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, **env_kill, "PYTHONPATH": str(project),
                               "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                       f"{os.environ['PATH']}"}, timeout=900)
    assert proc.returncode != 0
    assert not (project / "data" / "adapters" / "adapter.safetensors").exists()
    loss = project / "dvclive" / "pretrain" / "plots" / "metrics" / "train" / "loss.tsv"
    assert read_steps(loss) == [1, 2, 3, 4]  # logged before the kill

    out = run(["dvc", "repro"], project)
    # The stock stages ran before pre-training (dvc.yaml's order) and are not run again.
    assert ran_stages(out) == {"pretrain", "evaluate", "finetune", "report"}
    assert "resuming from the checkpoint of step 2" in out
    assert read_steps(loss) == [1, 2, 3, 4]  # steps 3 and 4 trained again, logged once
    info = json.loads((project / "data" / "adapters" / "adapter.json").read_text())
    assert info["step"] == 4
    resumed = adapter_digests(project)

    # Two uninterrupted runs of the stage, each in its own process from no checkpoint, give the
    # bytes of the killed-and-resumed one: heads, vectors, quantizer and description.
    for _ in range(2):
        shutil.rmtree(project / "data" / "checkpoints")
        out = run(["dvc", "repro", "-f", "-s", "pretrain"], project)
        assert "resuming" not in out
        assert adapter_digests(project) == resumed

    # Two processes under torchrun (gloo on CPU) from the same dvc.yaml command.
    # nproc keys a fine-tune too (the global batch), the stock one included.
    out = run(["dvc", "exp", "run", "-S", "nproc=2"], project)
    assert ran_stages(out) == {"pretrain", "stock_finetune", "evaluate", "finetune", "report"}
    pre = json.loads((project / "dvclive" / "pretrain" / "metrics.json").read_text())
    assert pre["steps"] == 4
