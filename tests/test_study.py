"""The study grid (study.yaml), its driver (stages/study.py) and README's table."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
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


@pytest.mark.parametrize(("grid", "message"), [
    ({"runs": {"r": {"lora_rank": 0}}}, "run 'r'.*lora_rank"),
    ({"runs": {"r": {"segment.nope": 1}}}, "run 'r'.*'segment.nope'"),
    ({"runs": {"Bad_Name": {}}}, "run name 'Bad_Name'"),
    ({"runs": {}}, "non-empty"),
    ({"runs": {"r": {"segment": {}}}}, "run 'r'.*{}: not a value `dvc exp run -S` can set"),
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
                     "adapter='lora'"]]
    rec = json.loads((work / "results/study/b.json").read_text())
    assert shlex.split(rec["command"]) == ["dvc", *runs[1]]  # a line a shell runs as it ran
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
    from typer.testing import CliRunner

    from stages.study import app

    done = CliRunner().invoke(app, ["plot", "--results", str(results)])
    assert done.exit_code == 0, done.output
    svg = (results / "curves.svg").read_text()
    assert svg.startswith("<svg") and "dev masked accuracy" in svg


def test_learning_table_row():
    from bestrq.study import learning_table

    rows = learning_table([_record("lora-beard", [7.9, 7.4, 7.1], [7.3, 7.3, 7.3])]).splitlines()
    assert rows[2] == ("| lora-beard | 5.43 | 6.91 / 7.02 | 2.3% / 1.0% | 150 | 260.0 -> 250.0 | "
                       "2.83 -> 2.50 | 1234 |")


# --- Grid values reach params.yaml as written (issue 38 item 10) ---------------------------

ODD = {
    "s_unicode": "café/ü ñ",
    "s_backslash": "a\\b\\",  # a trailing backslash too
    "s_quotes": "it's \"quoted\" \\'",
    "s_syntax": "a: b, [c] {d} = e # not a comment",
    "s_interp": "${x} \\${y} \\\\${w}{} $z ${",
    "s_lines": "tab\there\nnew line",
    "s_quote": "'",
    "s_backslashes": "\\\\",
    "s_true": "true",
    "s_null": "null",
    "s_number": "3",
    "s_float": "5e-05",
    "s_empty": "",
    "s_space": " lead and trail ",
    "flag": True,
    "nothing": None,
    "n": -7,
    "big": 2**40,
    "small": 5e-05,
    "huge": 1e20,
    "plain": 0.003,
    "lst": ["a b", "true", 1.5, -2],
    "sec": {"a": 2, "c": {"d": "x'y"}},  # a whole section: set key by key, the rest kept
}


def test_grid_values_reach_params_yaml_through_dvcs_own_parser_exactly_as_written(tmp_path):
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides
    from dvc.utils.hydra import to_hydra_overrides
    from dvc.utils.serialize import load_yaml

    from bestrq.params_file import read_yaml
    from bestrq.study import grid_overrides

    raw = {key: 0 for key in ODD} | {"sec": {"a": 0, "b": "kept", "c": {"d": 0}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = StudyRun("r", grid_overrides(ODD))
    expected = apply_overrides(raw, run.overrides)  # what the grid check validates
    assert expected["sec"] == {"a": 2, "b": "kept", "c": {"d": "x'y"}}
    # What `dvc exp run -S` does with them (dvc/repo/experiments/run.py, queue/base.py): the
    # file each is for, no sweep among them, then Hydra's parser and DVC's writer.
    overrides = to_path_overrides(run.set_args())
    assert list(overrides) == ["params.yaml"]
    assert not any(o.is_sweep_override() for o in to_hydra_overrides(overrides["params.yaml"]))
    dvc_apply_overrides(path, overrides["params.yaml"])
    for written in (load_yaml(path), read_yaml(path)):  # DVC's reader, the stages' reader
        assert written == expected
        for key, value in expected.items():
            assert type(written[key]) is type(value), key


def test_exponent_floats_in_the_grid_reach_the_stages_as_numbers(tmp_path):
    """Issue 38 item 3: `5e-5` in study.yaml is a float, goes to DVC as a Hydra float, and the
    `5e-05` DVC writes (Python's repr, whatever was passed) is read back by the stages' reader
    as that float, so the run's params pass the stages' checks."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    from bestrq.params import load_params

    grid = tmp_path / "study.yaml"
    grid.write_text("runs:\n  r: {learning_rate: 5e-5, adam_eps: 1e-9, "
                    "finetune: {learning_rate: 2.5E-5}}\n")
    (run,) = load_grid(grid, REPO / "params.yaml")
    assert run.set_args() == ["learning_rate=5e-05", "adam_eps=1e-09",
                              "finetune.learning_rate=2.5e-05"]
    params = tmp_path / "params.yaml"
    params.write_bytes((REPO / "params.yaml").read_bytes())
    dvc_apply_overrides(params, run.set_args())
    assert "learning_rate: 5e-05\n" in params.read_text()  # DVC's own spelling
    p = load_params(params)
    assert (p.train.learning_rate, p.train.adam_eps) == (5e-05, 1e-09)
    assert p.finetune.learning_rate == 2.5e-05


def test_set_args_are_hydra_values():
    run = StudyRun("r", {"distill_layers": [-2, -1], "adapter": "lora", "flag": True,
                         "w": 3.0, "odd": "a b", "lr": 5e-05})
    assert run.set_args() == ["distill_layers=[-2,-1]", "adapter='lora'", "flag=true",
                              "w=3.0", "odd='a b'", "lr=5e-05"]


def test_a_whole_section_in_the_grid_is_checked_as_dvc_merges_it(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("base:\n  segment: {dev_fraction: 0.1}\n"
                    "runs:\n  a: {segment.dev_fraction: 0.2, max_steps: 30}\n  b: {}\n")
    runs = load_grid(path, REPO / "params.yaml")
    assert [r.overrides for r in runs] == [{"segment.dev_fraction": 0.2, "max_steps": 30},
                                           {"segment.dev_fraction": 0.1}]
    assert runs[1].set_args() == ["segment.dev_fraction=0.1"]
    path.write_text("runs:\n  a: {segment: {nope: 1}}\n")
    with pytest.raises(ValueError, match="run 'a'.*'segment.nope'"):
        load_grid(path, REPO / "params.yaml")


# --- The tables read any genuine record and refuse damaged ones in one line ----------------

def _table(results: Path, *args: str):
    from typer.testing import CliRunner

    from stages.study import app

    return CliRunner().invoke(app, ["table", "--results", str(results), *args])


def test_table_of_a_study_without_asr_prints_what_there_is_and_names_what_is_absent(tmp_path):
    rec = _record("no-asr", [7.9, 7.4, 7.1], [7.3, 7.3, 7.3])
    rec["params"]["evaluate"] = {"asr": False}
    for split in ("test", "dev"):  # evaluate.asr: false leaves the zero-shot WERs out
        for key in ("stock", "bestrq", "zs_diff", "zs_low", "zs_high"):
            del rec["metrics"]["report"][split][key]
    (tmp_path / "no-asr.json").write_text(json.dumps(rec))
    done = _table(tmp_path)
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[2] == ("| no-asr | lora | -3 | [-2, -1] | 10 | 1000 | 7.10 / 7.30 | 150 | "
                        "n/a | n/a | n/a | 20.0 | 21.5 | +1.50 [+0.25, +2.75] | "
                        "+2.00, +3.00, -0.50 |")
    assert ("n/a: no-asr has no zero-shot stock, zero-shot adapted, zero-shot difference "
            "(evaluate.asr: false)") in lines
    assert ("| no-asr | 5.43 | 6.91 / 7.02 | 2.3% / 1.0% | 150 | 260.0 -> 250.0 | "
            "2.83 -> 2.50 | 1234 |") in lines


@pytest.mark.parametrize(("damage", "message"), [
    (lambda text: text[: len(text) // 2], "not a complete JSON record"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "metrics"}),
     "no 'metrics'"),
    (lambda text: text.replace('"max_steps": 1000', '"max_steps": "many"'),
     "params.max_steps"),
    (lambda text: text.replace('"ft_stock": 20.0', '"ft_stock": "20"'),
     "metrics.report.test.ft_stock"),
    (lambda text: text.replace('"dev/loss": [[50.0, 7.9]', '"dev/loss": [[50.0]'),
     "curves"),
])
def test_a_damaged_record_is_refused_in_one_line_naming_the_file(tmp_path, damage, message):
    good = _record("a", [7.9, 7.4, 7.1], [7.3, 7.3, 7.3])
    (tmp_path / "a.json").write_text(json.dumps(good))
    (tmp_path / "b.json").write_text(damage(json.dumps(good)))
    for command in ("table", "plot"):
        from typer.testing import CliRunner

        from stages.study import app

        done = CliRunner().invoke(app, [command, "--results", str(tmp_path)])
        assert done.exit_code == 2, (command, done.output)
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert str(tmp_path / "b.json") in done.stderr and message in done.stderr
        assert not (tmp_path / "curves.svg").exists()


def test_table_refuses_an_unknown_split_in_one_line(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_record("a", [7.9], [7.3])))
    done = _table(tmp_path, "--split", "foo")
    assert done.exit_code == 2
    assert done.stderr.splitlines() == ["error (study): --split foo: expected test or dev"]


# --- A stopped study ends all of DVC's processes and restores params.yaml and the index ----

STAGE_LOOP = """import pathlib, signal, sys, time
if sys.argv[1] == "stubborn":  # a stage that does not end on SIGINT or SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[2]).write_text("started")
while True:
    with open(sys.argv[2], "a") as f:
        f.write(".")
    time.sleep(0.02)
"""

HANGING_DVC = """#!{python}
import pathlib, subprocess, sys
if sys.argv[1:3] != ["exp", "run"]:
    sys.exit(0)
# As DVC does: the overrides written into params.yaml and staged, then the stages run.
params = pathlib.Path("params.yaml")
params.write_text(params.read_text() + "max_steps: 7  # the run's override\\n")
subprocess.run(["git", "add", "params.yaml"], check=True)
stage = subprocess.Popen([sys.executable, "-c", {loop!r}, "polite", "progress.txt"])
# As DVC's workspace run: HEAD detached while it runs, put back on its branch by a clean-up
# that a SIGINT (KeyboardInterrupt) runs and Python's default SIGTERM skips.
subprocess.run(["git", "checkout", "-q", "--detach"], check=True)
try:
    pathlib.Path("stage.pid").write_text(str(stage.pid))
    stage.wait()
finally:
    subprocess.run(["git", "checkout", "-q", "-"], check=True)
"""


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped by init, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_study_ends_dvcs_stage_and_restores_params_and_index(tmp_path, sig):
    work, env = _workspace(tmp_path, {"a": {}})
    (tmp_path / "bin" / "dvc").write_text(HANGING_DVC.format(python=sys.executable,
                                                             loop=STAGE_LOOP))
    committed = (work / "params.yaml").read_bytes()
    branch = subprocess.run(["git", "symbolic-ref", "HEAD"], cwd=work, capture_output=True,
                            text=True, check=True).stdout
    log = tmp_path / "study.log"  # not a pipe: a stage left running would hold it open
    with log.open("w") as out:
        study = subprocess.Popen([sys.executable, "-m", "stages.study", "run"], cwd=work,
                                 env=env, stdout=out, stderr=out)
    pid_file, progress = work / "stage.pid", work / "progress.txt"
    stage = None
    try:
        assert _wait_for(lambda: progress.is_file() and pid_file.is_file()
                         and pid_file.read_text(), 120), log.read_text()
        stage = int(pid_file.read_text())
        study.send_signal(sig)
        assert study.wait(timeout=60) == 128 + sig, log.read_text()
        assert _wait_for(lambda: not _alive(stage), 5), "the stage still runs"
        size = progress.stat().st_size
        time.sleep(0.2)
        assert progress.stat().st_size == size
        assert (work / "params.yaml").read_bytes() == committed
        staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=work,
                                capture_output=True, text=True, check=True).stdout
        assert staged == ""
        assert subprocess.run(["git", "symbolic-ref", "HEAD"], cwd=work, capture_output=True,
                              text=True).stdout == branch  # DVC's own clean-up ran
        assert subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=work,
                              capture_output=True, text=True).stdout == ""
    finally:
        study.kill()
        if stage is not None and _alive(stage):
            os.kill(stage, signal.SIGKILL)


def test_stop_group_kills_a_stage_that_ignores_sigint_and_sigterm_after_the_grace(tmp_path):
    from stages.study import stop_group

    progress = tmp_path / "progress.txt"
    group = subprocess.Popen(  # DVC's stand-in, and below it a stage deaf to SIGINT and SIGTERM
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "subprocess.Popen(sys.argv[1:])\ntime.sleep(60)",
         sys.executable, "-c", STAGE_LOOP, "stubborn", str(progress)],
        start_new_session=True)
    try:
        assert _wait_for(lambda: progress.is_file() and progress.stat().st_size > 10, 30)
        start = time.monotonic()
        assert stop_group(group, grace=0.5) == -signal.SIGINT  # DVC's stand-in ends at once
        assert 1.0 <= time.monotonic() - start < 5  # the stage, at SIGKILL after 2 x 0.5 s
        size = progress.stat().st_size
        time.sleep(0.2)
        assert progress.stat().st_size == size  # the stubborn stage is gone too
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
