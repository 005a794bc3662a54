"""Stage 7: the answer first. The four WERs and the two differences with their intervals, and
BEST-RQ's held-out loss beside the label prior, as the pipeline's metrics (`dvc exp show`
shows them first), and as interval plots (`dvc plots show`)."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import typer

from bestrq.report import absent, difference_records, flatten, summary, wer_records
from stages.common import ADAPTER, LIVE, friendly_errors, open_live, run_app
from stages.training_common import params_or_exit

app = typer.Typer(add_completion=False, help=__doc__)

SOURCES = ("evaluate", "finetune", "pretrain")  # dvclive/<name>/metrics.json


def read_sources(live_dir: Path = LIVE) -> dict[str, dict[str, Any]]:
    """The flattened DVCLive summaries of the stages the answer comes from (absent: empty)."""
    out: dict[str, dict[str, Any]] = {}
    for name in SOURCES:
        path = live_dir / name / "metrics.json"
        out[name] = flatten(json.loads(path.read_text())) if path.is_file() else {}
    return out


def run_record(model: str, adapter_json: Path, sources: dict[str, dict[str, Any]]
               ) -> dict[str, Any]:
    """What the run was made with, beside its metrics: the base model as named and the sha256
    of the weights actually loaded (from the adapter's description), the precision training
    ran in, and the versions of the packages that compute it (requirements.lock pins them)."""
    base = json.loads(adapter_json.read_text()).get("base", {}) if adapter_json.is_file() else {}
    versions = {}
    for package in ("torch", "torchaudio", "openai-whisper", "numpy", "dvc", "dvclive"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"command": "dvc repro", "model": model, "base_sha256": base.get("sha256"),
            "precision": {"pretrain": sources["pretrain"].get("precision"),
                          "finetune": sources["finetune"].get("adapted/precision")},
            "python": platform.python_version(), "packages": versions,
            # Only where figures are missing: a complete run's record stays as it was.
            **({"absent": lines} if (lines := absent(sources)) else {})}


@app.command()
def report(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Write dvclive/report/metrics.json (the answer), its interval plots and run.json."""
    p = params_or_exit("report", params)
    with friendly_errors():
        sources = read_sources()
        metrics = summary(sources)
        record = run_record(p.run.model, ADAPTER.with_suffix(".json"), sources)
    with open_live("report") as live:
        for key, value in metrics.items():
            live.log_metric(key, value, plot=False)
        # dvc.yaml declares these plots with the interval template (.dvc/plots/interval.json).
        live.log_plot("wer", wer_records(sources), x="wer", y="system", template="interval")
        live.log_plot("difference", difference_records(sources), x="difference",
                      y="comparison", template="interval")
        live.make_summary()
    (LIVE / "report" / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    typer.echo(json.dumps(metrics, indent=2))
    for line in record.get("absent", []):
        typer.secho(f"report: {line}", fg=typer.colors.YELLOW, err=True)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
