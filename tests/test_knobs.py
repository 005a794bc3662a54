"""A knob is declared once, beside the code that uses it (bestrq.knobs): adding one to a config
is all it takes for params.yaml's checks, `train --help` and the runs' identities to follow, and
for the test that holds dvc.yaml to name the stages that must list it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
import yaml
from typer.testing import CliRunner

from bestrq import params
from bestrq.knobs import check, knob
from bestrq.run_identity import finetune_key, pretrain_key
from bestrq.train import TrainConfig
from tests.test_dvc_deps import unlisted_knobs

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Extended(TrainConfig):
    """The engine's config with one knob more, as a contributor would add it."""

    label_smoothing: Annotated[float, knob(
        "smoothing of the training targets (a share of the mass)", ge=0, lt=1)] = 0.0


def test_a_new_knob_needs_only_its_declaration(monkeypatch, tmp_path):
    import stages.train as train_cli

    monkeypatch.setitem(params.TOP, "train", _Extended)
    composed = params._compose()
    monkeypatch.setattr(params, "TopLevel", composed)
    monkeypatch.setattr(train_cli, "TopLevel", composed)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert "label_smoothing" not in raw  # params.yaml does not name it yet: the default holds

    # params.yaml's checks: type and bounds as declared, the key named
    assert "label_smoothing" in params.hyperparameter_names()
    with pytest.raises(ValueError, match=r"label_smoothing: must be a number in \[0, 1\), got "
                                         r"1\.5"):
        params.from_dict({**raw, "label_smoothing": 1.5})
    p = params.from_dict({**raw, "label_smoothing": 0.1})
    assert p.train.label_smoothing == 0.1 and params.from_dict(raw).train.label_smoothing == 0.0

    # train --help: the option, with its help
    result = CliRunner().invoke(train_cli.build_command(REPO / "params.yaml"), ["--help"],
                                env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0
    assert "--label_smoothing" in result.output
    assert "smoothing of the training targets" in " ".join(result.output.split())

    # the identities: a checkpoint made with another value is not resumed, in either run
    features = tmp_path / "features"
    (features / "train").mkdir(parents=True)
    (features / "stats.json").write_text("{}")
    (features / "train" / "index.json").write_text("[]")
    default = params.from_dict(raw)
    assert pretrain_key(p, features).fingerprint != pretrain_key(default, features).fingerprint
    assert finetune_key(p, features, "stock", 0, None).fingerprint != \
        finetune_key(default, features, "stock", 0, None).fingerprint

    # dvc.yaml: the walk over the declarations names the knob for both stages it keys
    missing, _ = unlisted_knobs(tmp_path / "walk")
    assert missing == {"pretrain": ["label_smoothing"], "finetune": ["label_smoothing"]}


def test_a_config_built_in_code_is_checked_against_the_same_declaration():
    with pytest.raises(ValueError, match=r"^label_smoothing: must be a number in \[0, 1\), got "
                                         r"2\.0$"):
        check(_Extended(label_smoothing=2.0))
    check(_Extended(label_smoothing=0.5))
    with pytest.raises(ValueError, match=r"^batch_size: must be an integer in \[1, 65536\], "
                                         r"got 0\nmax_steps: must be an integer in \[1, "):
        TrainConfig(batch_size=0, max_steps=0).validate()


def test_speed_only_is_one_flag_per_name():
    """Run identity ignores speed-only knobs by their last dotted part, so a name is speed-only
    in every config or in none (checked as params.py composes), and the flags are the ones run
    identity ignores."""
    assert set(params.SPEED_ONLY) == {"checkpoint_every", "device", "gradient_checkpointing",
                                      "heldout_every", "keep_checkpoints", "log_every",
                                      "num_workers", "prefetch_factor"}
    for model in (params.TopLevel, *params.SECTION_MODELS.values()):
        for name in model.model_fields:
            if name in params.SPEED_ONLY:
                assert params.speed_only(model.model_fields[name]), name


def test_a_knob_declared_in_two_top_level_configs_is_refused(monkeypatch):
    @dataclass
    class Twice(TrainConfig):
        num_codebooks: Annotated[int, knob("declared again", ge=1, le=64)] = 1

    monkeypatch.setitem(params.TOP, "train", Twice)
    with pytest.raises(TypeError, match="knob num_codebooks is declared twice"):
        params._compose()
