import re
from pathlib import Path

import pytest
import yaml

from bestrq.params import from_dict, hyperparameter_names, load_params, validate

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_are_complete_and_valid():
    raw = repo_params()
    top = {k for k, v in raw.items() if not isinstance(v, dict)}
    assert top == set(hyperparameter_names())  # every knob is in params.yaml, nothing unknown
    p = from_dict(raw)
    assert p.quantizer.num_codebooks == 1 and p.quantizer.codebook_size == 8192
    assert p.quantizer.code_dim == 16 and p.masking.span_frames == 40
    assert p.masking.mask_prob == 0.01 and p.masking.mask_noise_std == 0.1
    assert p.quantizer.seed == p.train.seed == raw["seed"]


def test_dvc_yaml_tracks_every_hyperparameter_for_pretrain():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # ... and the evaluation knobs that fix the dev curves' masks (heldout_every).
    assert set(stages["pretrain"]["params"]) == set(hyperparameter_names()) | {
        "evaluate.seed", "evaluate.batch_size", "evaluate.max_clips", "evaluate.num_workers"}
    # upstream stages do not depend on training knobs: changing them re-runs only pretrain on
    assert not set(hyperparameter_names()) & set(stages["download"]["params"])
    assert stages["features"]["params"] == ["n_mels", "features"]


def test_overrides_apply(tmp_path, random_checkpoint):
    path = tmp_path / "params.yaml"
    raw = repo_params()
    raw["model"] = str(random_checkpoint)  # a checkpoint file: no download
    path.write_text(yaml.safe_dump(raw))
    p = load_params(path, {"num_codebooks": 16, "batch_size": 8, "accumulate_gradients": 256},
                    stage="pretrain")
    assert (p.quantizer.num_codebooks, p.train.batch_size, p.train.accumulate_gradients) == (
        16, 8, 256)


@pytest.mark.parametrize(("change", "message"), [
    ({"num_codebooks": 0}, "num_codebooks"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"mask_prob": 1.5}, "mask_prob"),
    ({"model": "whisper-huge-9"}, "model"),
    ({"nproc": 0}, "nproc"),
    ({"num_codebook": 4}, "num_codebook"),
    ({"download": {"source": "/no/such/folder"}}, "download.source"),
    ({"segment": {"test_fraction": 2.0}}, "test_fraction"),
    ({"segment": {"eval_fraction": 0.2}}, "unknown parameter segment.eval_fraction"),
    ({"finetune": {"seeds": []}}, "finetune.seeds"),
    ({"finetune": {"seeds": [1, 1]}}, "finetune.seeds"),
    ({"finetune": {"seeds": 3}}, "finetune.seeds"),
    ({"bestrq_layer": 5000}, "bestrq_layer"),
    ({"distill_layers": []}, "distill_layers"),
    ({"distill_layers": -1}, "distill_layers: must be a non-empty list"),
    ({"features": {"dtype": "int8"}}, "features.dtype"),
    ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size"),
    ({"evaluate": {"batchsize": 1}}, "evaluate.batchsize"),
    ({"a.b": 1}, r"unknown parameter a\.b; known: "),  # a dot in an unknown key
    ({"finetune": {"seeds": [0, "x"]}}, r"finetune\.seeds: must be a non-empty list of "
                                        r"distinct integers .*got 'x'"),  # a list's item
])
def test_bad_parameter_fails_naming_it(change, message, random_checkpoint):
    raw = repo_params()
    for key, value in change.items():
        if isinstance(value, dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    raw["model"] = change.get("model", str(random_checkpoint))
    with pytest.raises(ValueError, match=message):
        validate(from_dict(raw))


def test_every_knob_has_its_help_beside_its_declaration():
    from bestrq.params import SECTION_MODELS, TopLevel

    for model in (TopLevel, *SECTION_MODELS.values()):
        for name, info in model.model_fields.items():
            if name not in SECTION_MODELS:
                assert info.description and len(info.description) > 10, (model, name)


def test_n_mels_must_match_the_model_before_any_work():
    raw = repo_params()
    raw["model"] = "large-v3"
    with pytest.raises(ValueError, match="n_mels: model 'large-v3' takes 128 mel bins but "
                                         "n_mels is 80; set n_mels: 128"):
        validate(from_dict(raw))
    raw["n_mels"] = 128
    validate(from_dict(raw))


def test_every_key_has_a_declared_type_and_the_configs_defaults():
    from dataclasses import fields

    from bestrq.params import SECTION_MODELS, SECTIONS, TopLevel

    assert set(TopLevel.model_fields) == set(hyperparameter_names()) | set(SECTIONS)
    for name, cls in SECTIONS.items():
        assert set(SECTION_MODELS[name].model_fields) == {f.name for f in fields(cls)}, name
    # Nothing in params.yaml: the library's own defaults, built through the declarations.
    p = from_dict({})
    for name, cls in SECTIONS.items():
        assert getattr(p, name) == cls(), name
    from bestrq.params import TOP

    for name, cls in TOP.items():
        assert getattr(p, name) == cls(), name


def test_checked_values_are_normalised_and_complete():
    raw = repo_params()
    del raw["finetune"]
    raw["download"] = None  # `download:` with nothing under it
    raw["learning_rate"] = 1  # an integer is a fine number
    p = from_dict(raw)
    assert p.train.learning_rate == 1.0 and isinstance(p.train.learning_rate, float)
    assert p.raw["learning_rate"] == 1.0 and isinstance(p.raw["learning_rate"], float)
    assert p.raw["finetune"]["max_steps"] == p.finetune.max_steps  # defaults recorded too
    assert p.download.num_utterances == 240  # the library's default


def _set_by_dvc(tmp_path: Path, overrides: list[str]) -> Path:
    """A copy of the repository's params.yaml changed as `dvc exp run -S` changes it (DVC's own
    writer: Hydra overrides, written back by ruamel.yaml)."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    apply_overrides(path, overrides)
    return path


def test_floats_dvc_exp_run_set_are_read_as_numbers(tmp_path):
    path = _set_by_dvc(tmp_path, ["learning_rate=5e-5", "adam_eps=1E-9",
                                  "finetune.learning_rate=1e-5"])
    text = path.read_text()
    # What DVC writes: exponents without a dot, which YAML 1.1 (PyYAML) reads as text.
    assert "learning_rate: 5e-05" in text and "adam_eps: 1e-09" in text
    assert "  learning_rate: 1e-05" in text
    p = load_params(path)
    assert p.train.learning_rate == 5e-05 and p.train.adam_eps == 1e-09
    assert p.finetune.learning_rate == 1e-05
    assert p.raw["learning_rate"] == 5e-05 and p.raw["finetune"]["learning_rate"] == 1e-05
    assert type(p.train.max_steps) is int and type(p.raw["max_steps"]) is int  # ints stay ints


@pytest.mark.parametrize("written, value", [
    ("5e-05", 5e-05), ("1e-5", 1e-05), ("1E-5", 1e-05), ("3e-4", 3e-04), ("1.0e-4", 1e-04),
    ("2.5e+0", 2.5), ("1e+0", 1.0), ("1.", 1.0), (".5", 0.5), ("2", 2.0)])
def test_every_float_form_yaml_writes_is_a_number(tmp_path, written, value):
    text = (REPO / "params.yaml").read_text()
    text = text.replace("learning_rate: 0.003", f"learning_rate: {written}", 1)
    text = text.replace("max_minutes: 0.0", f"max_minutes: {written}", 1)  # in a section
    path = tmp_path / "params.yaml"
    path.write_text(text)
    p = load_params(path)
    assert p.train.learning_rate == value and type(p.train.learning_rate) is float
    assert p.finetune.max_minutes == value and type(p.finetune.max_minutes) is float


def test_the_reader_takes_yaml_1_2_floats_and_leaves_ints_and_quoted_text(tmp_path):
    from bestrq.params_file import read_yaml

    path = tmp_path / "grid.yaml"
    path.write_text("a: -2e+3\nb: [1e-5, 2, '3e-4']\nc: 20\nd: 0x1F\ne: '5e-05'\nf: 1_000\n"
                    "g: 1e5x\nh: -.5\n")
    values = read_yaml(path)
    assert values == {"a": -2000.0, "b": [1e-05, 2, "3e-4"], "c": 20, "d": 31, "e": "5e-05",
                      "f": 1000, "g": "1e5x", "h": -0.5}
    assert [type(values[k]) for k in "acdf"] == [float, int, int, int]
    assert yaml.safe_load("x: 1e-5") == {"x": "1e-5"}  # PyYAML's own loader is left as it was


def test_a_quoted_number_stays_text_and_is_refused_naming_the_key(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("learning_rate: 0.003",
                                                      "learning_rate: '5e-05'", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ValueError) as err:
        load_params(tmp_path / "params.yaml")
    assert str(err.value) == ("params.yaml: learning_rate: must be a number in (0, 10], got "
                              "'5e-05' (text, not a number: remove the quotes)")


def test_command_line_values_are_checked_and_named_as_such(tmp_path, random_checkpoint):
    path = tmp_path / "params.yaml"
    raw = repo_params()
    raw["model"] = str(random_checkpoint)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError) as err:
        load_params(path, {"batch_size": 2.5, "codebook_size": None})  # None: not given
    assert str(err.value) == "command line: batch_size: must be an integer in [1, 65536], got 2.5"


@pytest.mark.parametrize("text, message", [
    ("- 1\n- 2\n", "params.yaml: must be a mapping of parameters, got [1, 2]"),
    ("model: [unclosed\n", "params.yaml: not valid YAML"),
])
def test_a_file_that_is_not_a_mapping_is_named(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_params(tmp_path / "params.yaml")


def _params_file(tmp_path: Path, extra: str) -> Path:
    """The repository's params.yaml with `extra` text appended, as a file."""
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text() + extra)
    return path


@pytest.mark.parametrize("extra, message", [
    ("num_codebooks: 16\n", r"key 'num_codebooks' given twice \(lines \d+ and \d+\)"),
    ("1: 2\n", r"key 1 \(int\): parameter names are text"),
    ("null: 2\n", r"key None \(NoneType\): parameter names are text"),
    ("finetune_extra:\n  3: 4\n", r"key 3 \(int\)"),
])
def test_params_files_dvc_would_reject_are_named_not_crashed(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        load_params(_params_file(tmp_path, extra))


def test_an_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    import time

    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = (REPO / "params.yaml").read_text().replace("model: tiny.en", "model: *l8")
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n" + text)  # 9**9 strings if ever expanded
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        load_params(path)
    assert time.perf_counter() - start < 5.0
    (line,) = [x for x in str(err.value).splitlines() if x.startswith("params.yaml: model:")]
    assert line.startswith("params.yaml: model: must be a non-empty string, got [[[")
    assert len(line) < 300  # the value is quoted a few levels deep, never expanded


@pytest.mark.parametrize("key, line", [
    ("model", "model: " + "m" * 300),
    ("download.source", "  source: /data/" + "x" * 300),
])
def test_a_path_too_long_for_the_file_system_names_the_key(tmp_path, key, line):
    text = (REPO / "params.yaml").read_text()
    old = "model: tiny.en" if key == "model" else "  source: synthetic"
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, line.split("  #")[0], 1))
    with pytest.raises(ValueError, match=rf"{key}: '.*' is too long for a path \(\d+ bytes, "
                                         r"a name of \d+; at most 4096 and 255\)"):
        load_params(path)


def test_an_oversized_params_file_is_refused_before_parsing(tmp_path):
    path = _params_file(tmp_path, "#" * (1 << 20) + "\n")
    with pytest.raises(ValueError, match=r"bytes, more than a params file can be"):
        load_params(path)


def test_a_stage_given_a_duplicate_key_exits_2_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from stages.segment import app

    path = _params_file(tmp_path, "seed: 3\n")
    result = CliRunner().invoke(app, ["--params", str(path)])
    assert result.exit_code == 2
    assert "key 'seed' given twice" in result.output and "Traceback" not in result.output
