import os
import subprocess
import sys

import pytest
import torch

from bestrq.checkpoint import (
    KILL_ENV,
    checkpoint_name,
    latest_step,
    list_checkpoints,
    load_latest,
    save_checkpoint,
)


def state(value: float) -> dict:
    return {"w": torch.full((3, 4), value), "step_info": {"epoch": 2, "position": 16},
            "rng": (3, tuple(range(5)), None)}


def test_round_trip_and_keep(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, state(float(step)), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    step, loaded = load_latest(tmp_path)
    assert step == 30 and latest_step(tmp_path) == 30
    assert torch.equal(loaded["w"], torch.full((3, 4), 30.0))
    assert loaded["step_info"] == {"epoch": 2, "position": 16}
    assert loaded["rng"] == (3, (0, 1, 2, 3, 4), None)


def test_empty_or_missing_folder(tmp_path):
    assert load_latest(tmp_path / "nothing") is None
    assert latest_step(tmp_path) == 0


def test_corrupt_newest_falls_back_with_warning(tmp_path):
    save_checkpoint(tmp_path, 1, state(1.0))
    newest = save_checkpoint(tmp_path, 2, state(2.0))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=checkpoint_name(2) + ".*sha256"):
        step, loaded = load_latest(tmp_path)
    assert step == 1 and torch.equal(loaded["w"], torch.full((3, 4), 1.0))


def test_truncated_newest_falls_back(tmp_path):
    save_checkpoint(tmp_path, 1, state(1.0))
    newest = save_checkpoint(tmp_path, 2, state(2.0))
    newest.write_bytes(newest.read_bytes()[:-7])
    with pytest.warns(UserWarning, match="truncated"):
        assert load_latest(tmp_path)[0] == 1
    newest.write_bytes(b"")
    with pytest.warns(UserWarning, match="header"):
        assert load_latest(tmp_path)[0] == 1


def test_leftover_temp_file_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 5, state(5.0))
    tmp = tmp_path / ".tmp-step-abc"
    tmp.write_bytes(b"half a checkpoint")
    assert load_latest(tmp_path)[0] == 5
    save_checkpoint(tmp_path, 6, state(6.0))
    assert not tmp.exists()


def test_saving_an_earlier_step_drops_abandoned_later_ones(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, state(float(step)), keep=5)
    save_checkpoint(tmp_path, 2, state(-2.0), keep=5)  # a run resumed from step 1
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert torch.equal(load_latest(tmp_path)[1]["w"], torch.full((3, 4), -2.0))


@pytest.mark.parametrize("stage", ["partial", "written"])
def test_kill_during_write_leaves_previous_checkpoint(tmp_path, stage):
    save_checkpoint(tmp_path, 1, state(1.0))
    code = ("import sys, torch; from bestrq.checkpoint import save_checkpoint; "
            "save_checkpoint(sys.argv[1], 2, {'w': torch.zeros(1000)})")
    env = {**os.environ, KILL_ENV: f"2:{stage}"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env)
    assert proc.returncode == -9
    assert [p.name.startswith(".tmp-step-") for p in tmp_path.iterdir()].count(True) == 1
    assert load_latest(tmp_path)[0] == 1
