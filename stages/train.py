"""`train`: the original command line, e.g. `train --batch_size 4 --num_codebooks 16
--accumulate_gradients 256`. Defaults come from params.yaml; every hyper-parameter is an option.

It runs the same training as the `pretrain` stage, outside DVC: each run writes its adapter,
checkpoints and DVCLive log in a folder of its own, runs/train/<name> (--name; by default the
next free run-N) or --output_dir, which may be none of DVC's outputs nor the pipeline's
checkpoint folders, so that a run DVC did not record never overwrites what DVC tracks. To
record an experiment, use `dvc exp run -S name=value` instead. Add --traceback to see the full
traceback of an error.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, get_origin

import click
import typer
import yaml

from bestrq.params import TopLevel, check_types, hyperparameter_names
from bestrq.params_file import quote, read_yaml
from stages.common import (
    CHECKPOINTS,
    FEATURES,
    FINETUNE_CHECKPOINTS,
    friendly_errors,
    print_error,
    run_app,
    traceback_wanted,
)
from stages.pretrain import run_pretrain
from stages.training_common import params_or_exit, relaunch_under_torchrun

RUNS = Path("runs") / "train"
PIPELINE = Path("dvc.yaml")
# Where the pipeline's stages keep their checkpoints: state of the pipeline that dvc.yaml does
# not declare (a train run there would resume, or move aside, the pipeline's run).
CHECKPOINT_FOLDERS = (CHECKPOINTS, FINETUNE_CHECKPOINTS)
# How dvc.yaml declares a stage's outputs: `outs`, `metrics` and `plots`, each a list of paths
# or of {path: options}.
OUTPUT_KEYS = ("outs", "metrics", "plots")
DERIVED = re.compile(r"run-(\d+)")


def _defaults(params_file: Path) -> tuple[dict[str, Any], str]:
    """params.yaml's top-level values for the help text, read and checked as the stages read
    it (bounded, UTF-8, types and ranges); ({}, why) where a stage would refuse the file."""
    try:
        if not params_file.is_file():
            raise FileNotFoundError(f"{params_file} not found: run from the project root")
        raw = read_yaml(params_file)
        checked = check_types({} if raw is None else raw, source=params_file.name)
    except (ValueError, FileNotFoundError) as err:
        return {}, "; ".join(str(err).splitlines())
    values = checked.model_dump(mode="json")
    return {name: values[name] for name in hyperparameter_names()}, ""


class _Help(typer.core.TyperCommand):
    """The command, whose help first says (on stderr) why params.yaml's values are not shown."""

    warning = ""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.warning:
            typer.secho(f"warning (train): {self.warning}; --help shows the declared defaults",
                        fg=typer.colors.YELLOW, err=True)
        super().format_help(ctx, formatter)


class Refused(ValueError):
    """An output folder or run name `train` may not use."""


def pipeline_outputs(pipeline: Path = PIPELINE) -> list[tuple[Path, str]]:
    """Every output the stages of `pipeline` (dvc.yaml) declare, as (path, "DVC's output
    <path> (stage <name> of dvc.yaml)"), then the pipeline's checkpoint folders; paths as
    written, relative to the working folder (the project root the stages run in)."""
    found: list[tuple[Path, str]] = []
    spec = read_yaml(pipeline) if pipeline.is_file() else None
    stages = spec.get("stages") if isinstance(spec, dict) else None
    for name, stage in (stages.items() if isinstance(stages, dict) else ()):
        stage = stage.get("do", stage) if isinstance(stage, dict) else {}  # foreach/matrix
        folder = pipeline.parent / str(stage.get("wdir", "."))
        for key in OUTPUT_KEYS:
            entries = stage.get(key)
            for entry in entries if isinstance(entries, list) else ():
                for path in entry if isinstance(entry, dict) else [entry]:
                    text = str(path)
                    if "${" in text:  # templated: the literal folders before the template
                        text = text[:text.index("${")].rpartition("/")[0]
                    if text:
                        found.append((Path(os.path.normpath(folder / text)),
                                      f"DVC's output {text} (stage {name} of {pipeline})"))
    found += [(path, f"the pipeline's checkpoint folder {path}")
              for path in CHECKPOINT_FOLDERS]
    return found


def check_output_dir(out: Path, given: str, pipeline: Path = PIPELINE) -> None:
    """Refuse (`Refused`, one line starting with `given`, how the user named `out`) a folder
    that is, is inside or holds one of the pipeline's outputs, or that is or lies under a
    file."""
    where = out.resolve()
    for folder in (where, *where.parents):
        if folder.exists() and not folder.is_dir():
            if folder == where:
                raise Refused(f"{given} is a file, not a folder")
            raise Refused(f"{given} cannot be made: "
                          f"{os.path.relpath(folder)} is a file, not a folder")
    for path, what in pipeline_outputs(pipeline):
        target = path.resolve()
        relation = ("is" if where == target else "is inside" if target in where.parents
                    else "holds" if where in target.parents else "")
        if relation:
            raise Refused(f"{given} {relation} {what}: a run outside DVC writes "
                          f"in {RUNS}/<name> (--name) or a folder outside the pipeline's "
                          "outputs")


def check_name(name: str) -> None:
    """A run's name: one folder name."""
    if name in ("", ".", "..") or "/" in name or len(name.encode(errors="replace")) > 255:
        raise Refused(f"--name {quote(name)}: a run's name is one folder name, such as "
                      "lr-5e-5")


def next_run(runs: Path = RUNS) -> tuple[str, Path]:
    """A fresh folder runs/train/run-N (N one more than the highest there), made here, so that
    two runs started at once each get their own."""
    taken = [int(m[1]) for p in (runs.iterdir() if runs.is_dir() else ())
             if (m := DERIVED.fullmatch(p.name))]
    number = max(taken, default=0) + 1
    while True:
        name = f"run-{number}"
        try:
            (runs / name).mkdir(parents=True)
        except FileExistsError:
            number += 1
            continue
        return name, runs / name


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the parameter check then names the option and what it takes


def _option(name: str, default: Any, label: str = "params.yaml") -> inspect.Parameter:
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
        default=typer.Option(None, *flags, help=f"{help_text} ({label}: {default})",
                             show_default=False))


def build_command(params_file: Path = Path("params.yaml")) -> typer.Typer:
    """A Typer app whose options are every top-level key of params.yaml, typed and described
    as declared beside the configs (`bestrq.knobs`; an integer option rejects 2.5, naming
    the option)."""
    declared = {name: info.get_default(call_default_factory=True)
                for name, info in TopLevel.model_fields.items()}
    read, unread = _defaults(params_file)
    names = hyperparameter_names()

    def command(**kwargs: Any) -> None:
        given, name = kwargs.pop("output_dir"), kwargs.pop("name")
        features_dir = Path(kwargs.pop("features_dir"))
        try:
            if given is not None and name is not None:
                raise Refused("give --name or --output_dir, not both")
            if name is not None:
                check_name(name)
            # A run's own folder, or (before a name is drawn) the folder of named runs.
            out = Path(given) if given is not None else RUNS / name if name else RUNS
            check_output_dir(out, f"--output_dir {given}" if given is not None else str(out))
        except ValueError as err:  # Refused, or a dvc.yaml that cannot be read
            if traceback_wanted():
                raise
            print_error(err, "train")
            raise typer.Exit(code=2) from err
        for key, value in kwargs.items():  # a list given as YAML: --distill_layers "[-2, -1]"
            if get_origin(TopLevel.model_fields[key].annotation) in (list, tuple) \
                    and value is not None:
                kwargs[key] = _yaml_value(value)
        p = params_or_exit("pretrain", str(params_file), overrides=kwargs)
        made = None
        if given is None and name is None:  # torchrun's processes are given the name
            name, made = next_run()
            out = made
            typer.echo(f"train: {name} in {out} (--name {name} continues it)")
        try:
            relaunch_under_torchrun(p, "stages.train", None if made is None else
                                    [*sys.argv[1:], "--name", str(name)])
            with friendly_errors():
                run_pretrain(p, features_dir=features_dir,
                             adapter_path=out / "adapter.safetensors",
                             checkpoint_dir=out / "checkpoints",
                             live_name=str((out / "dvclive").resolve()))
        finally:
            if made is not None and made.is_dir() and not any(made.iterdir()):
                made.rmdir()  # a run that stopped before writing leaves no empty folder

    extra = [
        inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                          default=typer.Option(
                              None, "--name", show_default=False,
                              help=f"the run's folder, {RUNS}/<name>; the same name continues "
                                   "a run (default: the next free run-N)")),
        inspect.Parameter("output_dir", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                          default=typer.Option(
                              None, "--output_dir", "--output-dir", show_default=False,
                              help="the run's folder (adapter, checkpoints, dvclive/) instead "
                                   f"of {RUNS}/<name>: none of DVC's outputs")),
        inspect.Parameter("features_dir", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option(str(FEATURES), "--features_dir", "--features-dir",
                                               help="features written by the features stage")),
    ]
    label = "declared default" if unread else "params.yaml"
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [_option(n, read.get(n, declared[n]), label) for n in names] + extra)
    command.__doc__ = __doc__
    # Click's plain help: Typer's rich panel shows a type column even for flags and --help.
    app = typer.Typer(add_completion=False, rich_markup_mode=None)
    help_command = type("TrainCommand", (_Help,), {"warning": unread})
    app.command(cls=help_command)(command)
    return app


def main() -> None:
    run_app(build_command())


if __name__ == "__main__":
    main()
