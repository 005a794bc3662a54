"""The study grid (study.yaml), its driver (stages/study.py) and README's table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bestrq.study import StudyRun, apply_overrides, first_beat, load_grid, study_table

REPO = Path(__file__).resolve().parents[1]


def test_committed_grid_is_valid_and_sized_as_the_issue_asks():
    runs = load_grid(REPO / "study.yaml", REPO / "params.yaml")
    by_name = {r.name: r.overrides for r in runs}
    assert list(by_name)[:2] == ["lora-beard", "ia3-last"]
    for over in by_name.values():
        assert over["max_steps"] >= 1000
        assert over["finetune.max_minutes"] <= 10
        assert over["finetune.seeds"] == [0, 1, 2]
    beard = by_name["lora-beard"]
    assert (beard["adapter"], beard["bestrq_layer"], beard["distill_layers"]) == (
        "lora", -3, [-2, -1])
    assert "adapter" not in by_name["ia3-last"]  # params.yaml's: ia3, heads on the last block
    assert sorted({o.get("distill_weight", 10.0) for o in by_name.values()}) == [3.0, 10.0, 30.0]


def test_overrides_set_nested_keys_and_refuse_unknown_ones():
    raw = {"a": 1, "s": {"b": 2}}
    assert apply_overrides(raw, {"a": 5, "s.b": 7}) == {"a": 5, "s": {"b": 7}}
    assert raw == {"a": 1, "s": {"b": 2}}  # a copy
    with pytest.raises(ValueError, match="'s.c'"):
        apply_overrides(raw, {"s.c": 1})
    with pytest.raises(ValueError, match="no section 'x'"):
        apply_overrides(raw, {"x.b": 1})


def test_set_args_are_hydra_values():
    run = StudyRun("r", {"distill_layers": [-2, -1], "adapter": "lora", "flag": True,
                         "w": 3.0, "odd": "a b"})
    assert run.set_args() == ["distill_layers=[-2,-1]", "adapter=lora", "flag=true", "w=3.0",
                              'odd="a b"']


@pytest.mark.parametrize(("grid", "message"), [
    ({"runs": {"r": {"lora_rank": 0}}}, "run 'r'.*lora_rank"),
    ({"runs": {"r": {"segment.nope": 1}}}, "run 'r'.*'segment.nope'"),
    ({"runs": {"Bad_Name": {}}}, "run name 'Bad_Name'"),
    ({"runs": {}}, "non-empty"),
    ({"base": {"max_steps": 1}, "runs": {"r": {}}, "extra": 1}, "expected a mapping"),
])
def test_bad_grids_are_refused_naming_the_run_and_key(tmp_path, grid, message):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ValueError, match=message):
        load_grid(path, REPO / "params.yaml")


def _record(name: str, dev_loss: list[float], prior: list[float]) -> dict:
    answer = {"stock": 30.0, "bestrq": 29.0, "ft_stock": 20.0, "ft_bestrq": 21.5,
              "zs_diff": -1.0, "zs_low": -2.5, "zs_high": 0.5,
              "ft_diff": 1.5, "ft_low": 0.25, "ft_high": 2.75,
              "ft_diff_seed_10": -0.5, "ft_diff_seed_2": 3.0, "ft_diff_seed_0": 2.0}
    steps = [50.0 * (i + 1) for i in range(len(dev_loss))]
    return {"run": name,
            "params": {"adapter": "lora", "bestrq_layer": -3, "distill_layers": [-2, -1],
                       "distill_weight": 10.0, "max_steps": 1000},
            "metrics": {"report": {"test": answer, "dev": {
                **answer, "heldout": {"loss": dev_loss[-1], "prior_loss": prior[-1]}}},
                "evaluate": {"test": {
                    "adapted": {"loss": 6.91, "accuracy": 0.0234, "effective_rank": 250.04,
                                "davies_bouldin": 2.5},
                    "prior": {"loss": 7.02, "accuracy": 0.01},
                    "stock": {"effective_rank": 260.0, "davies_bouldin": 2.83}}},
                "pretrain": {"train": {"bestrq_loss": 5.4321}, "train_seconds": 1234.4}},
            "curves": {"dev/loss": [[s, v] for s, v in zip(steps, dev_loss, strict=True)],
                       "dev/prior_loss": [[s, v] for s, v in zip(steps, prior, strict=True)]}}


def test_first_beat_and_table_row():
    rec = _record("lora-beard", [7.9, 7.4, 7.1], [7.3, 7.3, 7.3])
    assert first_beat(rec["curves"]) == 150.0
    assert first_beat(_record("x", [7.9, 7.4], [7.3, 7.3])["curves"]) is None
    table = study_table([rec]).splitlines()
    assert len(table) == 3 and table[0].count("|") == table[1].count("|") == table[2].count("|")
    assert table[2] == ("| lora-beard | lora | -3 | [-2, -1] | 10 | 1000 | 7.10 / 7.30 | 150 | "
                        "30.0 | 29.0 | -1.00 [-2.50, +0.50] | 20.0 | 21.5 | "
                        "+1.50 [+0.25, +2.75] | +2.00, +3.00, -0.50 |")


FAKE_DVC = """#!{python}
import json, pathlib, sys
args = sys.argv[1:]
with open("calls.txt", "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] != ["exp", "run"]:
    sys.exit(1)
pathlib.Path("params.yaml").write_text(pathlib.Path("params.yaml").read_text() + "# by dvc\\n")
if "batch_size=3" in args:  # a run that fails half-way, after DVC has edited params.yaml
    sys.exit(3)
for stage in {stages!r}:
    d = pathlib.Path("dvclive", stage)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({{"stage": stage, "args": args}}))
dev = pathlib.Path("dvclive/pretrain/plots/metrics/dev")
dev.mkdir(parents=True, exist_ok=True)
(dev / "loss.tsv").write_text("step\\tloss\\n50\\t7.5\\n100\\t7.0\\n")
"""


def _workspace(tmp_path: Path, runs: dict) -> tuple[Path, dict]:
    from stages.study import STAGES

    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    (work / "study.yaml").write_text(yaml.safe_dump({"base": {"max_steps": 30}, "runs": runs}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dvc"
    fake.write_text(FAKE_DVC.format(python=sys.executable, stages=STAGES))
    fake.chmod(0o755)
    for cmd in (["init", "-q"], ["add", "params.yaml"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"]):
        subprocess.run(["git", *cmd], cwd=work, check=True)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    return work, env


def _study(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.study", "run", *args], cwd=work,
                          env=env, capture_output=True, text=True)


def test_driver_runs_each_run_once_keeps_records_and_restores_params(tmp_path):
    work, env = _workspace(tmp_path, {"a": {"batch_size": 2}, "b": {"adapter": "lora"}})
    original = (work / "params.yaml").read_bytes()
    done = _study(work, env)
    assert done.returncode == 0, done.stderr
    assert (work / "params.yaml").read_bytes() == original
    calls = [json.loads(line) for line in (work / "calls.txt").read_text().splitlines()]
    runs = [c for c in calls if c[:2] == ["exp", "run"]]
    assert runs == [["exp", "run", "--name", "study-a", "-S", "max_steps=30", "-S",
                     "batch_size=2"],
                    ["exp", "run", "--name", "study-b", "-S", "max_steps=30", "-S",
                     "adapter=lora"]]
    rec = json.loads((work / "results/study/b.json").read_text())
    assert rec["overrides"] == {"max_steps": 30, "adapter": "lora"}
    assert rec["metrics"]["report"]["args"] == runs[1]
    assert rec["curves"] == {"dev/loss": [[50.0, 7.5], [100.0, 7.0]]}
    assert rec["params"]["model"] == "tiny.en" and len(rec["commit"]) == 40
    # Again: both have records, nothing runs.
    assert _study(work, env).returncode == 0
    again = [json.loads(line) for line in (work / "calls.txt").read_text().splitlines()]
    assert [c for c in again if c[:2] == ["exp", "run"]] == runs


def test_driver_refuses_edited_params_and_reports_a_failed_run(tmp_path):
    work, env = _workspace(tmp_path, {"a": {}, "b": {}})
    (work / "params.yaml").write_text((work / "params.yaml").read_text() + "# mine\n")
    done = _study(work, env)
    assert done.returncode == 2 and "uncommitted changes" in done.stderr
    assert not (work / "calls.txt").exists()
    assert (work / "params.yaml").read_text().endswith("# mine\n")  # left as it was
    subprocess.run(["git", "checkout", "params.yaml"], cwd=work, check=True)
    done = _study(work, env, "--only", "nope")
    assert done.returncode == 2 and "--only nope: not in" in done.stderr


def test_a_failed_run_stops_the_study_without_a_record_and_restores_params(tmp_path):
    work, env = _workspace(tmp_path, {"a": {"batch_size": 3}, "b": {}})
    original = (work / "params.yaml").read_bytes()
    done = _study(work, env)
    assert done.returncode == 2 and "run 'a' failed (exit 3)" in done.stderr
    assert (work / "params.yaml").read_bytes() == original
    assert not (work / "results").exists()
    calls = (work / "calls.txt").read_text()
    assert "study-a" in calls and "study-b" not in calls


def test_curves_spec_draws_each_run_beside_its_prior_and_plot_writes_an_svg(tmp_path):
    from bestrq.study import curves_spec

    recs = [_record("a", [7.9, 7.1], [7.3, 7.3]), _record("b", [7.5, 7.4], [7.3, 7.2])]
    rows = curves_spec(recs)["data"]["values"]
    loss = [(r["run"], r["series"], r["step"], r["value"]) for r in rows if r["metric"] == "loss"]
    assert loss == [("a", "BEST-RQ", 50.0, 7.9), ("a", "BEST-RQ", 100.0, 7.1),
                    ("a", "label prior", 50.0, 7.3), ("a", "label prior", 100.0, 7.3),
                    ("b", "BEST-RQ", 50.0, 7.5), ("b", "BEST-RQ", 100.0, 7.4),
                    ("b", "label prior", 50.0, 7.3), ("b", "label prior", 100.0, 7.2)]
    pytest.importorskip("vl_convert")
    results = tmp_path / "results"
    results.mkdir()
    for rec in recs:
        (results / f"{rec['run']}.json").write_text(json.dumps(rec))
    done = subprocess.run([sys.executable, "-m", "stages.study", "plot", "--results",
                           str(results)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    svg = (results / "curves.svg").read_text()
    assert svg.startswith("<svg") and "dev masked accuracy" in svg


def test_learning_table_row():
    from bestrq.study import learning_table

    rows = learning_table([_record("lora-beard", [7.9, 7.4, 7.1], [7.3, 7.3, 7.3])]).splitlines()
    assert rows[2] == ("| lora-beard | 5.43 | 6.91 / 7.02 | 2.3% / 1.0% | 150 | 260.0 -> 250.0 | "
                       "2.83 -> 2.50 | 1234 |")
