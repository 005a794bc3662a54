"""Training across machines: how a machine finds its place (`nodes_from_env`), and, end to end,
2 machines x 1 process (two project clones on 127.0.0.1, gloo, static rendezvous) against
1 machine x 2 processes, with a killed run resumed from node 0's checkpoints alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file
from test_pipeline import SMALL, make_project, run

from bestrq.checkpoint import KILL_ENV, checkpoint_name, read_checkpoint
from bestrq.distributed import (
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    NODE_RANK_ENV,
    Nodes,
    nodes_from_env,
    same_on_every_rank,
)
from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper, save_whisper_checkpoint


def test_one_machine_needs_no_variables_and_runs_standalone():
    assert nodes_from_env(1, {}) == Nodes()
    assert nodes_from_env(1, {NODE_RANK_ENV: "0"}) == Nodes()
    assert Nodes().torchrun_args() == ["--standalone"]


def test_several_machines_take_rank_and_address_from_the_environment():
    env = {NODE_RANK_ENV: "1", MASTER_ADDR_ENV: "10.0.0.1", MASTER_PORT_ENV: "29600"}
    nodes = nodes_from_env(3, env)
    assert nodes == Nodes(3, 1, "10.0.0.1", 29600)
    # Static rendezvous: node ranks are the ones given, so rank 0 (the writer) is on node 0.
    assert nodes.torchrun_args() == ["--nnodes", "3", "--node_rank", "1", "--master_addr",
                                     "10.0.0.1", "--master_port", "29600"]
    assert nodes_from_env(2, {NODE_RANK_ENV: "0", MASTER_ADDR_ENV: "h"}).master_port == 29500


@pytest.mark.parametrize(("nnodes", "env", "message"), [
    (2, {}, f"set {NODE_RANK_ENV} and {MASTER_ADDR_ENV}"),
    (2, {NODE_RANK_ENV: "1"}, f"set {MASTER_ADDR_ENV}"),
    (2, {NODE_RANK_ENV: "2", MASTER_ADDR_ENV: "h"}, f"{NODE_RANK_ENV}: must be an integer in "
                                                    "[0, 1] (nnodes is 2), got '2'"),
    (2, {NODE_RANK_ENV: "-1", MASTER_ADDR_ENV: "h"}, "got '-1'"),
    (2, {NODE_RANK_ENV: "0", MASTER_ADDR_ENV: "h", MASTER_PORT_ENV: "70000"},
     f"{MASTER_PORT_ENV}: must be an integer in [1, 65535]"),
    # A machine whose params.yaml still says one machine must not train alone, unnoticed.
    (1, {NODE_RANK_ENV: "1"}, "but nnodes is 1"),
])
def test_missing_or_bad_variables_are_named(nnodes, env, message):
    with pytest.raises(ValueError) as err:
        nodes_from_env(nnodes, env)
    assert message in str(err.value)


def _agree(rank: int, port: int, values: list[str], errors: mp.Queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=len(values))
    try:
        same_on_every_rank(values[rank], "the parameters")
        errors.put((rank, ""))
    except ValueError as err:
        errors.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("values", [["a", "a"], ["a", "b"]])
def test_ranks_holding_other_inputs_stop_together(values):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    mp.start_processes(_agree, args=(free_port(), values, errors), nprocs=2,
                       start_method="spawn")
    got = dict(errors.get(timeout=60) for _ in values)
    if values[0] == values[1]:
        assert got == {0: "", 1: ""}
    else:  # every rank raises, so none waits for the others in a collective
        assert got[0] == got[1] != ""
        assert got[0].startswith("the parameters of rank(s) 1 differ from rank 0's")


# ----------------------------------------------------------------------------- end to end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_params(project: Path, **values: object) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params.update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def start(cmd: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """`cmd` in the background, as `run` runs it, plus `env`; output to `log`."""
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1", **env}
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=full, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{proc.args} did not end:\n{log.read_text()[-6000:]}")


def trainable_at(checkpoints: Path, step: int) -> dict[str, torch.Tensor]:
    return read_checkpoint(checkpoints / checkpoint_name(step))[1]["trainable"]


def description(adapter: Path) -> dict:
    """adapter.json without the parameters that say how the run was spread (and how many
    checkpoints the reference kept)."""
    info = json.loads(adapter.with_suffix(".json").read_text())
    for key in ("nproc", "nnodes", "keep_checkpoints"):
        info["params"].pop(key)
    return info


@pytest.mark.slow
def test_two_machines_match_one_machine_with_two_processes_and_resume(tmp_path, monkeypatch):
    ckpt = tmp_path / "random-whisper.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), ckpt)
    node0 = make_project(tmp_path, str(ckpt), {**SMALL, "max_steps": 4, "batch_size": 1})
    # Machine 0 makes the features and shares them through a DVC remote (a local folder here);
    # machine 1 is a clone that pulls them, as README "Several machines" says.
    run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], node0)
    run(["dvc", "repro", "features"], node0)
    run(["dvc", "push"], node0)
    run(["git", "add", "-A"], node0)
    run(["git", "commit", "-qm", "features"], node0)
    node1 = tmp_path / "node1"
    run(["git", "clone", "-q", str(node0), str(node1)], tmp_path)
    run(["dvc", "pull", "features"], node1)
    # torchrun gives each process one thread when it starts several on a machine: the same in
    # every layout, so that they can agree to the bit.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    # The reference: 1 machine x 2 processes, with the `train` command (the stage's code).
    run([sys.executable, "-m", "stages.train", "--nproc", "2", "--nnodes", "1",
         "--keep_checkpoints", "10", "--output_dir", "runs/one"], node0)
    one = node0 / "runs" / "one"

    # 2 machines x 1 process; machine 0 records the run with DVC, machine 1 only trains.
    for node in (node0, node1):
        set_params(node, nnodes=2)
    rendezvous = {MASTER_ADDR_ENV: "127.0.0.1", MASTER_PORT_ENV: str(free_port())}
    py_pretrain = [sys.executable, "-m", "stages.pretrain"]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    # Killed while writing the checkpoint of step 3: steps 1 and 2 are on machine 0's disk.
    second = start(py_pretrain, node1, logs[1], **{NODE_RANK_ENV: "1"}, **rendezvous)
    first = start(["dvc", "repro", "pretrain"], node0, logs[0], **{NODE_RANK_ENV: "0"},
                  **rendezvous, **{KILL_ENV: "3:written"})
    assert finish(first, logs[0]) != 0
    assert finish(second, logs[1]) != 0  # machine 1 stops when its peer is gone
    checkpoints = node0 / "data" / "checkpoints"
    for name, value in trainable_at(one / "checkpoints", 2).items():
        assert torch.equal(trainable_at(checkpoints, 2)[name], value), name
    assert not (node1 / "data" / "checkpoints").exists()  # rank 0 alone writes them

    # Both machines start again: machine 1 resumes from machine 0's checkpoint, sent to it.
    rendezvous[MASTER_PORT_ENV] = str(free_port())
    second = start(py_pretrain, node1, logs[1], **{NODE_RANK_ENV: "1"}, **rendezvous)
    for name, value in {NODE_RANK_ENV: "0", **rendezvous}.items():
        monkeypatch.setenv(name, value)
    out = run(["dvc", "repro", "pretrain"], node0)
    assert finish(second, logs[1]) == 0, logs[1].read_text()[-6000:]
    assert "resuming from the checkpoint of step 2" in out
    adapters = node0 / "data" / "adapters"
    for name in ("adapter.safetensors", "adapter-only.safetensors"):
        ours, reference = load_file(adapters / name), load_file(one / name)
        assert ours.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(ours[key], value), (name, key)  # bitwise
    assert description(adapters / "adapter.safetensors") == description(one / "adapter.safetensors")
    key = load_file(adapters / "adapter-only.safetensors")["ia3.encoder.blocks.0.attn.key"]
    assert (key - 1).abs().max() > 1e-4  # training moved the vectors: the match is not trivial
    assert not (node1 / "data" / "adapters").exists()  # machine 0 writes and records the run
    metrics = json.loads((node0 / "dvclive" / "pretrain" / "metrics.json").read_text())
    assert metrics["steps"] == 4
