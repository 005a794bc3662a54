"""bench/gpu_check.py's smoke run (a CPU, a small shape, a few steps): one table, every row
run, every figure a positive finite number."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ROWS = ["pretrain test N=1 ckpt off", "pretrain test N=1 ckpt on", "pretrain test N=16 ckpt off",
        "pretrain test N=16 ckpt on", "finetune test ia3", "decode test greedy <=4 tokens"]
FIGURES = ("step_s", "windows_s", "tokens_s", "tflops", "peak_mib")


def test_gpu_check_smoke(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    # fp32: what every CPU runs alike (auto is bf16 only on CPUs with bf16 hardware)
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke",
                          "--device", "cpu", "--precision", "fp32", "--json", str(rows_file)],
                         capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("config "))
    assert [c.strip() for c in lines[header].split("|")] == [
        "config", "batch", "steps", "step ms", "windows/s", "tokens/s", "TFLOP/s", "MFU %",
        "peak MiB", "est. MiB", "note"]
    table = lines[header + 1:]
    assert [line.split("|")[0].strip() for line in table] == ROWS
    assert "precision torch.float32" in run.stdout and lines[0].startswith("CPU ")

    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [row["config"] for row in rows] == ROWS
    for row in rows:
        assert row["batch"] >= 1 and row["steps"] >= 1, row
        assert not row["note"].startswith(("skipped", "out of memory")), row
        for key in FIGURES:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        # MFU needs a GPU's peak rate: none on a CPU
        assert row["mfu"] is None if not torch.cuda.is_available() else 0 < row["mfu"] < 1
        pretrain = row["config"].startswith("pretrain")
        assert (row["estimate_mib"] is not None) == pretrain, row
        if pretrain:
            assert math.isfinite(row["estimate_mib"]) and row["estimate_mib"] > 0
            # pre-training's tokens are the encoder's frames: 1500 a window
            assert row["tokens_s"] == pytest.approx(1500 * row["windows_s"])
    by = {row["config"]: row for row in rows}
    for n in (1, 16):  # checkpointing holds less at its peak than no checkpointing
        assert by[f"pretrain test N={n} ckpt on"]["peak_mib"] < \
            by[f"pretrain test N={n} ckpt off"]["peak_mib"]
    # 16 codebooks' heads hold more than one codebook's
    assert by["pretrain test N=16 ckpt off"]["peak_mib"] > by["pretrain test N=1 ckpt off"][
        "peak_mib"]
    assert by["decode test greedy <=4 tokens"]["note"] == "4 tokens a window"
