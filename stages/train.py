"""`train`: the original command line, e.g. `train --batch_size 4 --num_codebooks 16
--accumulate_gradients 256`. Defaults come from params.yaml; every hyper-parameter is an option.

It runs the same training as the `pretrain` stage, outside DVC: outputs go to runs/train/ by
default, so DVC-tracked outputs are never overwritten by a run DVC did not record. To record an
experiment, use `dvc exp run -S name=value` instead.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer
import yaml

from bestrq.params import MODEL_HELP, TRAIN_HELP, hyperparameter_names
from bestrq.train import TrainConfig
from stages.common import FEATURES, friendly_errors, params_or_exit, relaunch_under_torchrun
from stages.pretrain import run_pretrain

RUNS = Path("runs") / "train"
TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def _defaults(params_file: Path) -> dict[str, Any]:
    raw = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}
    return {k: v for k, v in (raw or {}).items() if not isinstance(v, dict)}


def _option(name: str, default: Any) -> inspect.Parameter:
    help_text = MODEL_HELP.get(name) or TRAIN_HELP.get(name, name.replace("_", " "))
    kind = type(default) if default is not None else str
    # The original CLI spells options with underscores; dashes work too.
    flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
        default=typer.Option(default, *flags, help=help_text, show_default=True))


def build_command(params_file: Path = Path("params.yaml")) -> typer.Typer:
    """A Typer app whose options are every top-level key of params.yaml."""
    defaults = {**TRAIN_DEFAULTS, **_defaults(params_file)}
    names = [n for n in hyperparameter_names() if n in defaults]

    def command(**kwargs: Any) -> None:
        out = Path(kwargs.pop("output_dir"))
        features_dir = Path(kwargs.pop("features_dir"))
        p = params_or_exit("pretrain", str(params_file), overrides=kwargs)
        relaunch_under_torchrun(p, "stages.train")
        with friendly_errors():
            run_pretrain(p, features_dir=features_dir, adapter_path=out / "adapter.safetensors",
                         checkpoint_dir=out / "checkpoints", live_name="train")

    extra = [
        inspect.Parameter("output_dir", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option(str(RUNS), "--output_dir", "--output-dir",
                                               help="where the adapter and checkpoints go")),
        inspect.Parameter("features_dir", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option(str(FEATURES), "--features_dir", "--features-dir",
                                               help="features written by the features stage")),
    ]
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [_option(n, defaults[n]) for n in names] + extra)
    command.__doc__ = __doc__
    app = typer.Typer(add_completion=False)
    app.command()(command)
    return app


def main() -> None:
    build_command()()


if __name__ == "__main__":
    main()
