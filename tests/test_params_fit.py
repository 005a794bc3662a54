"""Knobs the code cannot use with the base model or the corpus are refused before any work,
each in one line naming the knob: blocks the encoder lacks and an odd stack_frames when the
params are read (dvc.yaml's first stage, check, before any data stage), heads too large for
the machine's memory before anything is allocated, a micro-batch larger than the training split
before a model is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from bestrq import params
from bestrq.params import load_params

REPO = Path(__file__).resolve().parents[1]


def params_file(tmp_path: Path, **changes: str) -> Path:
    """The repository's params.yaml with top-level `key: value` lines replaced as written."""
    lines = (REPO / "params.yaml").read_text().splitlines()
    for key, value in changes.items():
        (i,) = [i for i, line in enumerate(lines) if line.startswith(f"{key}:")]
        lines[i] = f"{key}: {value}"
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("changes, message", [
    # tiny.en (a Whisper name: its depth is known before the weights are downloaded) has 4 blocks
    ({"bestrq_layer": "4"}, "bestrq_layer: must be a block of the encoder of model 'tiny.en', "
                            "an integer in [-4, 3] (4 blocks; negative counts from the top), "
                            "got 4"),
    ({"distill_layers": "[-2, -5]"}, "distill_layers: must be a block of the encoder of model "
                                     "'tiny.en', an integer in [-4, 3] (4 blocks; negative "
                                     "counts from the top), got -5"),
    ({"distill_layers": "[-1, 3]"}, "distill_layers: must be a non-empty list of distinct "
                                    "blocks, got [-1, 3]"),  # the same block twice
    ({"model": "base.en", "bestrq_layer": "-7"}, "bestrq_layer: must be a block of the encoder "
                                                  "of model 'base.en', an integer in [-6, 5]"),
    ({"model": "large-v3", "n_mels": "128", "distill_layers": "[32]"},
     "distill_layers: must be a block of the encoder of model 'large-v3', an integer in "
     "[-32, 31]"),
    ({"stack_frames": "3"}, "params.yaml: stack_frames: must be a multiple of 2 in [2, 64], "
                            "got 3"),
])
def test_blocks_and_stacks_the_encoder_cannot_use_are_refused_on_reading(tmp_path, changes,
                                                                         message):
    with pytest.raises(ValueError) as err:
        load_params(params_file(tmp_path, **changes))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_checkpoints_depth_is_read_from_its_header(tmp_path, random_checkpoint):
    # TINY_TEST_DIMS: 2 blocks; tiny.en's -3 is not one of them
    path = params_file(tmp_path, model=str(random_checkpoint), bestrq_layer="-3")
    with pytest.raises(ValueError, match=r"^bestrq_layer: must be a block of the encoder of "
                                         r"model '.*random\.pt', an integer in \[-2, 1\] "
                                         r"\(2 blocks; "):
        load_params(path)
    p = load_params(params_file(tmp_path, model=str(random_checkpoint), bestrq_layer="-2",
                                distill_layers="[-1]"))
    assert p.loss.resolve(2) == (0, (1,))
    # A model whose depth cannot be told without the network: pretrain checks it on loading.
    assert load_params(params_file(tmp_path, model="owner/not-cached-here", bestrq_layer="-9")
                       ).loss.bestrq_layer == -9


def test_the_first_stage_refuses_them_in_one_line_before_any_work(tmp_path, monkeypatch):
    import stages.check

    monkeypatch.chdir(tmp_path)
    path = params_file(tmp_path, bestrq_layer="-5")
    result = CliRunner().invoke(stages.check.app, ["--params", str(path)])
    assert result.exit_code == 2 and not (tmp_path / "data").exists()  # nothing written
    assert result.output.strip() == (
        "error (check): bestrq_layer: must be a block of the encoder of model 'tiny.en', an "
        "integer in [-4, 3] (4 blocks; negative counts from the top), got -5")
    result = CliRunner().invoke(stages.check.app, ["--params", str(params_file(tmp_path))])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "params.checked").is_file()


def test_heads_too_large_for_the_machine_are_named_before_allocation(tmp_path, monkeypatch):
    monkeypatch.setattr(params, "physical_memory", lambda: 64 * 10**9)
    load_params(params_file(tmp_path, num_codebooks="16"))  # USM's 16 x 8192: 0.8 GB
    path = params_file(tmp_path, num_codebooks="64", codebook_size="1048576")
    with pytest.raises(ValueError) as err:
        load_params(path)
    # 64 x 2^20 heads of tiny.en's width 384 (+ bias): 16 bytes each number
    heads = 64 * 2**20 * 385 * 16
    quantizer = 4 * (64 * 160 * 16 + 64 * 2**20 * 16 + 160)
    assert str(err.value) == (
        f"num_codebooks x codebook_size: 64 x 1048576 codes need "
        f"{(heads + quantizer) / 1e9:.1f} GB to train (heads {heads / 1e9:.1f} GB on the width "
        "384 of model 'tiny.en': weights, gradient and AdamW's moments, 16 bytes a number; "
        f"quantizer {quantizer / 1e9:.1f} GB with code_dim 16), more than this machine's 64.0 "
        "GB of memory: lower num_codebooks, codebook_size or code_dim")
    # Each of nproc processes holds its own: 16 x 2^18 codes (26 GB) fit one, not four.
    fits = params_file(tmp_path, num_codebooks="16", codebook_size="262144")
    load_params(fits)
    with pytest.raises(ValueError, match=r"in each of nproc 4 processes, more than"):
        load_params(fits, {"nproc": 4})


def test_a_micro_batch_larger_than_the_training_split_is_refused_before_the_model(
        tmp_path, monkeypatch):
    import bestrq.recipes.pretrain as recipe
    from bestrq.features import FeatureConfig, compute_features
    from stages.pretrain import run_pretrain
    from tests.test_features import write_segments

    write_segments(tmp_path / "segments", {"train": [2.0, 3.0, 4.0], "dev": [2.0]})
    features = tmp_path / "features"
    compute_features(tmp_path / "segments", features, 80, FeatureConfig(device="cpu"))

    def no_model(*_):
        raise AssertionError("a model was built")

    monkeypatch.setattr(recipe, "load_whisper", no_model)
    p = load_params(params_file(tmp_path, batch_size="65536"))
    with pytest.raises(ValueError) as err:
        run_pretrain(p, features_dir=features, adapter_path=tmp_path / "a.safetensors",
                     checkpoint_dir=tmp_path / "ckpt")
    assert str(err.value) == (
        f"batch_size: 65536 windows a micro-batch, more than the 3 training windows in "
        f"{features / 'train'}: set batch_size to at most 3 (accumulate_gradients makes an "
        "update larger)")
    assert not (tmp_path / "ckpt").exists()
    p = load_params(params_file(tmp_path, batch_size="3"))  # as many as there are: it goes on
    with pytest.raises(AssertionError, match="a model was built"):
        run_pretrain(p, features_dir=features, adapter_path=tmp_path / "a.safetensors",
                     checkpoint_dir=tmp_path / "ckpt")
