"""Bytes the default corpus takes on disk: the workspace's data/ and DVC's cache, after
`dvc repro features` in a fresh clone of this repository.

    python bench/disk_footprint.py --ref HEAD --clone /tmp/footprint
    python bench/disk_footprint.py --ref HEAD --cache-type copy --clone /tmp/footprint-copy

Each file's blocks are counted once: `du` is given data/ and .dvc/cache in one call, and a
hardlinked file (DVC's `hardlink` cache type) is one inode in both. With `copy` (DVC's default
where the file system has no reflinks, e.g. ext4) every output is there twice. The clone's
dvc.lock hashes of the data stages' outputs are printed too: the cache type changes how they
are stored, never what they hold.
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

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "segment", "features")


def cpu() -> str:
    """The CPU's model and the matrix extensions that decide its bf16 speed."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    model = re.search(r"Model name:\s*(.+)", text)
    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_tile)\b", text)))
    return f"{model.group(1).strip() if model else 'unknown'}, {os.cpu_count()} cores, " \
           f"flags: {' '.join(flags) or 'no bf16/amx'}"


def du(*paths: Path) -> int:
    """Apparent bytes under `paths`, each inode once (one `du` call)."""
    out = subprocess.run(["du", "-sb", "--total", *map(str, paths)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="the commit to clone")
    parser.add_argument("--clone", type=Path, default=Path("/tmp/footprint"),
                        help="where to clone (removed first)")
    parser.add_argument("--cache-type", default=None,
                        help="DVC's cache.type for this clone (.dvc/config.local); default: "
                             "what the commit's .dvc/config says")
    args = parser.parse_args()

    shutil.rmtree(args.clone, ignore_errors=True)
    run(["git", "clone", "-q", str(REPO), str(args.clone)], REPO)
    run(["git", "checkout", "-q", args.ref], args.clone)
    commit = run(["git", "rev-parse", "--short", "HEAD"], args.clone).strip()
    if args.cache_type:
        run(["dvc", "config", "--local", "cache.type", args.cache_type], args.clone)
    said = run(["dvc", "config", "cache.type"], args.clone).strip() if args.cache_type else ""
    if not said:
        config = (args.clone / ".dvc" / "config").read_text()
        found = re.search(r"^\s*type\s*=\s*(.+)$", config, re.M)
        said = found.group(1).strip() if found else "DVC's default (reflink,copy)"

    start = time.perf_counter()
    run(["dvc", "repro", "features"], args.clone)
    seconds = time.perf_counter() - start
    data, cache = args.clone / "data", args.clone / ".dvc" / "cache"
    lock = yaml.safe_load((args.clone / "dvc.lock").read_text())["stages"]
    record = {
        "cpu": cpu(),
        "commit": commit,
        "cache_type": said,
        "repro_seconds": round(seconds, 1),
        "workspace_bytes": du(data),
        "cache_bytes": du(cache),
        "together_bytes": du(data, cache),
        "outs": {stage: {o["path"]: o["md5"] for o in lock[stage]["outs"]} for stage in STAGES},
    }
    print(json.dumps(record, indent=1))
    mb = 1e6
    print(f"commit {commit}, cache.type {said}: workspace {record['workspace_bytes'] / mb:.1f} "
          f"MB, cache {record['cache_bytes'] / mb:.1f} MB, together (each inode once) "
          f"{record['together_bytes'] / mb:.1f} MB; dvc repro features {seconds:.0f} s on "
          f"{record['cpu']} (a shared machine)")


if __name__ == "__main__":
    main()
