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
    assert p.masking.mask_prob == 0.01 and p.masking.noise_std == 0.1
    assert p.quantizer.seed == p.train.seed == raw["seed"]


def test_dvc_yaml_tracks_every_hyperparameter_for_pretrain():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages["pretrain"]["params"]) == set(hyperparameter_names())
    # upstream stages do not depend on training knobs: changing them re-runs only pretrain on
    assert not set(hyperparameter_names()) & set(stages["download"]["params"])
    assert stages["features"]["params"] == ["n_mels", "features"]


def test_overrides_apply(tmp_path):
    path = tmp_path / "params.yaml"
    raw = repo_params()
    raw["model"] = str(path)  # any existing file passes the model check
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
    ({"segment": {"eval_fraction": 2.0}}, "eval_fraction"),
    ({"features": {"dtype": "int8"}}, "features.dtype"),
    ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size"),
    ({"evaluate": {"batchsize": 1}}, "evaluate.batchsize"),
])
def test_bad_parameter_fails_naming_it(change, message):
    raw = repo_params()
    for key, value in change.items():
        if isinstance(value, dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    raw["model"] = change.get("model", str(REPO / "params.yaml"))
    with pytest.raises(ValueError, match=message):
        validate(from_dict(raw))


def test_every_hyperparameter_has_help():
    from bestrq.params import MODEL_HELP, TRAIN_HELP

    assert set(hyperparameter_names()) <= set(MODEL_HELP) | set(TRAIN_HELP)


def test_n_mels_must_match_the_model_before_any_work():
    raw = repo_params()
    raw["model"] = "large-v3"
    with pytest.raises(ValueError, match="n_mels: model 'large-v3' takes 128 mel bins but "
                                         "n_mels is 80; set n_mels: 128"):
        validate(from_dict(raw))
    raw["n_mels"] = 128
    validate(from_dict(raw))
