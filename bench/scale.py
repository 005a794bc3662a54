"""The data stages at scale: H hours of synthetic speech through download, segment and features,
then one epoch of the training loader, with the disk, time and memory each takes per hour of audio.

A project is made in --workdir from this checkout's code and params.yaml (the synthetic source,
scaled to --hours), put under git and DVC, and each data stage runs alone (`dvc repro -s`). For
each stage: wall time and the peak resident memory of its largest process (`/usr/bin/time`'s
maximum RSS over the stage's process tree is the largest single process). For each data folder:
bytes in the workspace, in DVC's cache and both together, a file linked into the cache counted
once (the `cache.type` of .dvc/config decides whether there is a second copy). Then the loader
reads every training window once, as pre-training would, with the log-mels stored or computed on
the fly (`features.store`), and its windows per second are printed.

    python bench/scale.py --hours 10 --out results/scale/scale-10h.json

What this measures is the CPU; what it says of 1,000 h on a GPU is an extrapolation from the
per-hour figures (README "At scale").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["bestrq", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config",
                 ".dvc/plots", ".dvcignore", ".gitignore"]
# check: the first stage, params.yaml read whole (seconds), which download depends on.
DATA_STAGES = ("check", "download", "segment", "features")
OUTS = {"download": "data/raw", "segment": "data/segments", "features": "data/features"}
# The default corpus: 800 utterances of 16 speakers are 0.85 h of audio (dvclive/segment), so
# an hour is about 940 utterances; speakers grow with the hours so each keeps about 50 min.
UTTERANCES_PER_HOUR = 940


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        text = f.read()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({os.cpu_count()} cores; {', '.join(has) or 'no avx2'})"


def make_project(workdir: Path, hours: float, store: bool) -> Path:
    """A fresh git + DVC project in `workdir` with this checkout's code, sized to `hours`."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    for name in PROJECT_FILES:
        src, dst = REPO / name, workdir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dst)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["download"]["num_utterances"] = max(100, round(hours * UTTERANCES_PER_HOUR))
    params["download"]["num_speakers"] = max(16, round(hours * 1.2))
    params["features"]["store"] = store
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "scale"]):
        subprocess.run(cmd, cwd=workdir, check=True)
    return workdir


def run_stage(project: Path, stage: str) -> dict[str, float]:
    """Wall seconds and peak RSS (bytes) of `dvc repro -s stage`."""
    env = {**os.environ, "PYTHONPATH": str(project), "DVC_NO_ANALYTICS": "1",
           "TQDM_DISABLE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", "dvc", "repro", "-s", stage],
                          cwd=project, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro -s {stage} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    rss = re.findall(r"MAXRSS_KB=(\d+)", proc.stderr)
    return {"seconds": took, "peak_rss_bytes": float(rss[-1]) * 1024 if rss else float("nan")}


def tree_bytes(paths: list[Path]) -> int:
    """Bytes of the files under `paths`, each inode once (a hard link is not a second copy; a
    symbolic link is not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in paths:
        if not root.exists():
            continue
        for dirpath, _, files in os.walk(root):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen and not os.path.islink(
                        os.path.join(dirpath, name)):
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


def disk(project: Path) -> dict[str, dict[str, int]]:
    """Workspace, cache and both-together bytes of each data folder."""
    cache = project / ".dvc" / "cache"
    both_all = tree_bytes([project / "data", cache])
    out = {"all": {"workspace": tree_bytes([project / "data"]), "cache": tree_bytes([cache]),
                   "together": both_all}}
    for stage, folder in OUTS.items():
        out[stage] = {"workspace": tree_bytes([project / folder])}
    return out


def loader_epoch(project: Path) -> dict[str, float]:
    """One epoch of the training windows through the loader pre-training uses (params.yaml's
    batch_size, num_workers, prefetch_factor), log-mels as the project's `features.store` says:
    computed on this CPU, batch by batch, when not stored, as the training device would."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from bench.loader_speed import loader_rate\n"
        "from bestrq.dataset import FeatureDataset\n"
        "from bestrq.params import load_params\n"
        "project = Path(sys.argv[1])\n"
        "p = load_params(project / 'params.yaml')\n"
        "split = FeatureDataset(project / 'data' / 'features' / 'train')\n"
        "batches = len(split) // p.train.batch_size - 1\n"
        "rate = loader_rate(split, p, batches, 1, not split.stored)\n"
        "print('LOADER=' + json.dumps({'windows': batches * p.train.batch_size,\n"
        "      'windows_per_second': rate, 'stored': split.stored}))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(project)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"loader epoch failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LOADER="))
    return {**json.loads(line.removeprefix("LOADER=")),
            "process_seconds": time.perf_counter() - start}


def audio_hours(project: Path) -> float:
    seg = json.loads((project / "dvclive" / "segment" / "metrics.json").read_text())
    return sum(float(v) for k, v in seg.items() if k.startswith("hours_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=10.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bestrq-scale"))
    parser.add_argument("--store", choices=["true", "false"], default="false",
                        help="features.store of the run (false: log-mels on the fly)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the project afterwards")
    args = parser.parse_args()
    store = args.store == "true"
    print(f"CPU: {cpu_name()}; load average {os.getloadavg()[0]:.1f}")
    project = make_project(args.workdir, args.hours, store)
    config = (project / ".dvc" / "config").read_text()
    stages: dict[str, Any] = {}
    for stage in DATA_STAGES:
        stages[stage] = run_stage(project, stage)
        print(f"{stage:9} {stages[stage]['seconds']:8.1f} s  peak RSS "
              f"{stages[stage]['peak_rss_bytes'] / 2**20:7.0f} MiB", flush=True)
    hours = audio_hours(project)
    sizes = disk(project)
    loader = loader_epoch(project)
    record = {"cpu": cpu_name(), "hours_asked": args.hours, "audio_hours": hours,
              # Other work on the machine stretches wall times: the load average says how much.
              "load_average_1_5_15_at_end": list(os.getloadavg()),
              "features_store": store,
              "cache_type": re.findall(r"type\s*=\s*(\S+)", config) or ["copy (DVC default)"],
              "stages": stages, "disk_bytes": sizes, "loader": loader,
              "per_hour": {
                  **{f"{s}_seconds": stages[s]["seconds"] / hours for s in DATA_STAGES},
                  **{f"{s}_workspace_bytes": sizes[s]["workspace"] / hours for s in OUTS},
                  "workspace_bytes": sizes["all"]["workspace"] / hours,
                  "cache_bytes": sizes["all"]["cache"] / hours,
                  "together_bytes": sizes["all"]["together"] / hours}}
    print(f"{hours:.2f} h of audio; features.store: {store}; cache.type: "
          f"{record['cache_type'][0]}")
    print(f"{'per hour of audio':24} {'value':>12}")
    for key, value in record["per_hour"].items():
        shown = f"{value / 1e6:10.1f} MB" if key.endswith("bytes") else f"{value:10.1f} s"
        print(f"{key:24} {shown:>12}")
    print(f"loader, one epoch of train: {loader['windows']} windows at "
          f"{loader['windows_per_second']:.1f} windows/s (log-mels "
          f"{'stored' if loader['stored'] else 'on the fly, on this CPU'})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(project)


if __name__ == "__main__":
    main()
