"""The stock baselines in stages of their own (stock_eval, stock_finetune): the adapted systems
compared with stock hypotheses decoded earlier give the numbers of one run that decodes both,
the stock encoder probed alone gives the figures it gets beside the adapted one, and dvc.yaml
keeps the stock stages free of BEST-RQ inputs. `dvc exp run -S num_codebooks=16` skipping them
is tests/test_pipeline.py's."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from test_asr import Windows

from bestrq.adapters import IA3
from bestrq.adapters.ia3 import add_ia3, ia3_state_dict
from bestrq.asr import AsrConfig
from bestrq.evaluate import (
    Decoded,
    EvaluateConfig,
    compare_asr,
    compare_wers,
    decoded_from_rows,
    probe_encoders,
    probe_whisper,
    system_wers,
)
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper, save_whisper_checkpoint
from stages.stock_common import split_figures, stock_figures

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


class Voices(Windows):
    """Windows with ids and speakers, as the features' datasets have them."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        texts = ["red green", "blue", "cat dog fish", "one two", "three", "four five six"][:n]
        super().__init__([torch.randn(80, 3000, generator=g) * 0.5 for _ in range(n)], texts)
        self.ids = [f"w{i}" for i in range(n)]
        self.groups = [f"s{i % 2}" for i in range(n)]


def vectors(seed: int) -> dict[str, torch.Tensor]:
    """IA^3 vectors drawn around one: each set decodes its own text from a random Whisper."""
    encoder = random_whisper(TINY_TEST_DIMS).encoder
    add_ia3(encoder)
    g = torch.Generator().manual_seed(seed)
    return {f"ia3.encoder.{k}": 1.0 + 0.5 * torch.randn(v.shape, generator=g)
            for k, v in ia3_state_dict(encoder).items()}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "random.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS, seed=0), path, half=False)
    return str(path)


CONFIG = AsrConfig(batch_size=2, decoding="greedy", bootstrap_samples=200, seed=5)


def test_zero_shot_against_stock_decoded_before_gives_the_numbers_of_one_run(model_path):
    data, adapted = Voices(5), vectors(1)
    together = compare_asr(model_path, adapted, data, CONFIG, CPU)  # both decoded here
    rows: list[dict] = []
    alone = system_wers(model_path, "stock", {"stock": None}, data, CONFIG, CPU, windows=rows)
    # stock_eval's figures: the stock ones of the joint run, every number equal
    assert alone == {k: v for k, v in together.items()
                     if k.startswith("stock/") or k in ("asr_clips", "asr_speakers")}
    assert not any("delta" in k for k in alone) and alone["asr_speakers"] == 2.0
    assert [r["id"] for r in rows] == data.ids and {"stock", "stock_errors"} <= set(rows[0])
    kept = decoded_from_rows([{"split": "test", **r} for r in rows], "test", ["stock"],
                             "dvclive/stock_eval/windows.json")["stock"]
    apart: list[dict] = []
    compared = compare_asr(model_path, adapted, data, CONFIG, CPU, windows=apart, stock=kept)
    # evaluate's comparison: the joint run's numbers, but the stock decoding counts (which
    # stock_eval keeps) are not made up here
    assert {**alone, **compared} == together
    assert "stock/fallback_windows" not in compared and "adapted/fallback_windows" in compared
    assert any(r["stock"] != r["adapted"] for r in apart)  # two systems, not one twice
    assert {r["id"]: r["stock"] for r in apart} == {r["id"]: r["stock"] for r in rows}


def test_seeds_pooled_against_stock_fine_tunes_decoded_before(model_path):
    # finetune.seeds [0, 1]: each seed's stock and adapted systems, pooled over the seeds
    data = Voices(4)
    systems = {"stock@0": (vectors(10), IA3), "adapted@0": (vectors(11), IA3),
               "stock@1": (vectors(12), IA3), "adapted@1": (vectors(13), IA3)}
    together = compare_wers(model_path, systems, data, CONFIG, CPU, baseline="stock",
                            other="adapted", repeats=["0", "1"])
    rows: list[dict] = []
    stock = {k: v for k, v in systems.items() if k.startswith("stock")}
    alone = system_wers(model_path, "stock", stock, data, CONFIG, CPU, windows=rows,
                        repeats=["0", "1"])
    kept = decoded_from_rows([{"split": "dev", **r} for r in rows], "dev",
                             ["stock@0", "stock@1"], "dvclive/stock_finetune/windows.json")
    order = ("stock@0", "adapted@0", "stock@1", "adapted@1")  # as the finetune stage gives
    apart = compare_wers(model_path, {k: kept.get(k, systems[k]) for k in order}, data, CONFIG,
                         CPU, baseline="stock", other="adapted", repeats=["0", "1"])
    assert {**alone, **apart} == together
    assert {"stock/wer", "seed_1/stock/wer_low", "stock@1/fallback_windows", "seeds"} <= set(alone)
    assert {"delta/wer", "seed_0/delta/wer_high"} <= set(apart) and not any(
        "delta" in k for k in alone)


def test_stock_hypotheses_of_other_windows_are_refused_naming_the_file(model_path):
    data = Voices(3)
    texts = {"w0": "a", "w1": "b", "w2": "c"}
    references = dict(zip(data.ids, data.transcripts, strict=True))
    for stale in (Decoded({"w0": "a", "w1": "b"}, references, "dvclive/stock_eval/windows.json"),
                  Decoded(texts, {**references, "w2": "another text"},
                          "dvclive/stock_eval/windows.json")):
        with pytest.raises(ValueError, match=r"^dvclive/stock_eval/windows\.json: the stock "
                                             r"hypotheses were decoded for other windows"):
            compare_asr(model_path, vectors(1), data, CONFIG, CPU, stock=stale)
    with pytest.raises(ValueError, match="no 'stock' hypothesis on some test windows"):
        decoded_from_rows([{"split": "test", "id": "w0", "reference": "x"}], "test", ["stock"],
                          "w.json")


def test_stock_encoder_probed_alone_gives_the_figures_it_gets_beside_the_adapted_one():
    base = random_whisper(TINY_TEST_DIMS, seed=0)
    stock = copy.deepcopy(base.encoder)  # the stock stage builds no adapter
    model = BestRQModel(base.encoder, RandomProjectionQuantizer(QuantizerConfig(codebook_size=16)),
                        MaskingConfig())
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name.endswith(".scale"):
                p.copy_(torch.linspace(0.2, 1.8, p.numel()).reshape(p.shape))
    g = torch.Generator().manual_seed(5)
    clips = Windows([torch.randn(80, 3000, generator=g) * 0.5 for _ in range(3)], [None] * 3)
    cfg = EvaluateConfig(batch_size=2, probe_frames=500, probe_clusters=4)
    both = probe_encoders(model, clips, cfg, CPU, progress=False)
    assert probe_whisper(stock, clips, cfg, CPU, progress=False) == {
        k: v for k, v in both.items() if k.startswith("stock/")}
    adapted = probe_encoders(model, clips, cfg, CPU, progress=False, systems=("adapted",))
    assert adapted == {k: v for k, v in both.items() if k.startswith("adapted/")}
    assert both["adapted/effective_rank"] != both["stock/effective_rank"]


def test_stock_figures_are_the_stock_keys_of_the_summary(tmp_path):
    (tmp_path / "stock_finetune").mkdir()
    (tmp_path / "stock_finetune" / "metrics.json").write_text(json.dumps({
        "labelled_clips": 3, "step": 2, "stock": {"train_seconds": 1.5, "train": {"loss": 2.0}},
        "seed_1": {"stock": {"precision": "fp32"}},
        "test": {"asr_clips": 4, "stock": {"wer": 0.5}, "stock@1": {"fallback_windows": 1},
                 "seed_1": {"stock": {"wer": 0.4}}}}))
    got = stock_figures("stock_finetune", tmp_path)
    assert got == {"stock/train_seconds": 1.5, "stock/train/loss": 2.0,
                   "seed_1/stock/precision": "fp32", "test/stock/wer": 0.5,
                   "test/stock@1/fallback_windows": 1, "test/seed_1/stock/wer": 0.4}
    assert split_figures(got, "test") == {"stock/wer": 0.5, "stock@1/fallback_windows": 1,
                                          "seed_1/stock/wer": 0.4}
    with pytest.raises(FileNotFoundError, match=r"run `dvc repro stock_eval` first"):
        stock_figures("stock_eval", tmp_path)


def test_the_stock_stages_read_no_bestrq_knob_or_adapter():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = {name: {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
            for name, stage in stages.items()}
    # the same evaluate and fine-tune knobs as the stages that compare with them ...
    assert stages["stock_eval"]["params"] == stages["evaluate"]["params"]
    assert stages["stock_finetune"]["params"] == stages["finetune"]["params"]
    # ... none of BEST-RQ's, and no adapter: `-S num_codebooks=16` leaves them up to date
    for name in ("stock_eval", "stock_finetune"):
        assert not {"num_codebooks", "codebook_size", "mask_prob", "seed", "max_steps",
                    "learning_rate", "bestrq_layer"} & set(stages[name]["params"])
        assert not [d for d in deps[name] if d.startswith(("data/adapters", "dvclive/"))]
        assert {"data/features", "data/segments"} <= deps[name]
    # the comparing stages read the stock stages' hypotheses and figures
    assert {"dvclive/stock_eval/metrics.json", "dvclive/stock_eval/windows.json"} <= \
        deps["evaluate"]
    assert {"dvclive/stock_finetune/metrics.json", "dvclive/stock_finetune/windows.json"} <= \
        deps["finetune"]
    outs = {name: {o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])}
            for name, stage in stages.items()}
    assert "data/finetune/stock" in outs["stock_finetune"]
    assert "data/finetune/adapted" in outs["finetune"]
