"""Stage 0: every parameter of params.yaml checked before any data stage runs.

The data stages read and check only their own sections (they import no training code, so
editing it re-runs none of them). This stage checks the whole file as the training stages will
(types and ranges, the model, blocks and memory the knobs need), so that a typo in
`num_codebooks` or `model` stops a fresh `dvc repro` in seconds, not after the corpus has been
downloaded, segmented and featurised. download depends on its output, whose bytes never
change: when training code or a training knob changes, this stage runs again and nothing after
it does.
"""

from __future__ import annotations

import typer

from bestrq.atomic import atomic_write_text
from stages.common import DATA, run_app
from stages.training_common import params_or_exit

app = typer.Typer(add_completion=False, help=__doc__)

CHECKED = DATA / "params.checked"  # must match dvc.yaml
# The same bytes whatever the parameters: what depends on this file waits for the check, and
# is never re-run by it.
MARK = "params.yaml passed every check (stages/check.py)\n"


@app.command()
def check(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Check every parameter (exit code 2 and one line per bad key otherwise), then write
    data/params.checked."""
    params_or_exit("check", params)
    CHECKED.parent.mkdir(parents=True, exist_ok=True)
    # A new file, never written in place: with DVC's link cache types the old one is the cache.
    atomic_write_text(CHECKED, MARK)
    typer.echo(f"check: {params} passed")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
