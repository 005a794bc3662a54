"""`train`: the original command line, e.g. `train --batch_size 4 --num_codebooks 16
--accumulate_gradients 256`. Defaults come from params.yaml; every hyper-parameter is an option.

It runs the same training as the `pretrain` stage, outside DVC: outputs go to runs/train/ by
default, so DVC-tracked outputs are never overwritten by a run DVC did not record. To record an
experiment, use `dvc exp run -S name=value` instead. Add --traceback to see the full traceback
of an error.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal, get_origin

import typer
import yaml

from bestrq.params import TopLevel, hyperparameter_names
from stages.common import (
    FEATURES,
    friendly_errors,
    params_or_exit,
    relaunch_under_torchrun,
    run_app,
)
from stages.pretrain import run_pretrain

RUNS = Path("runs") / "train"


def _defaults(params_file: Path) -> dict[str, Any]:
    """What params.yaml says, for the help text only: it is read and checked again to run."""
    try:
        raw = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}
    except yaml.YAMLError:
        raw = {}
    return {k: v for k, v in raw.items() if not isinstance(v, dict)} if isinstance(raw, dict) \
        else {}


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the parameter check then names the option and what it takes


def _option(name: str, default: Any) -> inspect.Parameter:
    info = TopLevel.model_fields[name]
    help_text, kind = info.description, info.annotation
    # The original CLI spells options with underscores; dashes work too.
    spellings = dict.fromkeys([name, name.replace("_", "-")])
    if kind is bool:
        flags = [f"--{n}/--no-{n}" for n in spellings]
    else:
        if get_origin(kind) is Literal or kind not in (int, float, str):
            kind = str  # a choice or a list: the parameter check names the key and what fits
        flags = [f"--{n}" for n in spellings]
    # None unless given: params.yaml's value then applies, checked as it is written there
    # (Click would turn a default of 2.5 for an integer option into 2).
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=kind | None,
        default=typer.Option(None, *flags, help=f"{help_text} (params.yaml: {default})",
                             show_default=False))


def build_command(params_file: Path = Path("params.yaml")) -> typer.Typer:
    """A Typer app whose options are every top-level key of params.yaml, typed and described
    as declared beside the configs (`bestrq.knobs`; an integer option rejects 2.5, naming
    the option)."""
    declared = {name: info.get_default(call_default_factory=True)
                for name, info in TopLevel.model_fields.items()}
    defaults = {**declared, **_defaults(params_file)}
    names = hyperparameter_names()

    def command(**kwargs: Any) -> None:
        out = Path(kwargs.pop("output_dir"))
        features_dir = Path(kwargs.pop("features_dir"))
        for name, value in kwargs.items():  # a list given as YAML: --distill_layers "[-2, -1]"
            if get_origin(TopLevel.model_fields[name].annotation) in (list, tuple) \
                    and value is not None:
                kwargs[name] = _yaml_value(value)
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
    # Click's plain help: Typer's rich panel shows a type column even for flags and --help.
    app = typer.Typer(add_completion=False, rich_markup_mode=None)
    app.command()(command)
    return app


def main() -> None:
    run_app(build_command())


if __name__ == "__main__":
    main()
