"""The report: the answer's numbers taken from evaluate's and finetune's summaries, the plot
records that hold them, and the offline page template DVC fills."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bestrq.report import difference_records, flatten, summary, wer_records

REPO = Path(__file__).resolve().parents[1]


def _system(wer: float) -> dict[str, float]:
    return {"wer": wer, "wer_low": wer - 0.05, "wer_high": wer + 0.05}


SOURCES = {
    "evaluate": flatten({"stock": _system(0.429),
                         "adapted": {**_system(0.233), "loss": 7.81, "accuracy": 0.015},
                         "delta": {"wer": -0.196, "wer_low": -0.562, "wer_high": -0.006},
                         "prior": {"loss": 7.30, "accuracy": 0.005}}),
    "finetune": flatten({"stock": _system(0.364), "adapted": _system(0.348),
                         "delta": {"wer": -0.016, "wer_low": -0.037, "wer_high": -0.002}}),
    "pretrain": flatten({"train": {"loss": 6.3}}),
}


def test_flatten_joins_dvclive_nesting_with_slashes():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}


def test_summary_puts_the_answer_first_in_wer_points():
    out = summary(SOURCES)
    assert list(out)[:10] == ["wer/stock", "wer/bestrq", "wer/ft_stock", "wer/ft_bestrq",
                              "diff/zero_shot", "diff/zs_low", "diff/zs_high",
                              "diff/finetuned", "diff/ft_low", "diff/ft_high"]
    assert out["wer/stock"] == 42.9 and out["wer/ft_bestrq"] == 34.8
    assert out["diff/zero_shot"] == -19.6 and out["diff/zs_low"] == -56.2
    assert out["diff/finetuned"] == -1.6 and out["diff/ft_high"] == -0.2
    assert out["bestrq/loss"] == 7.81 and out["bestrq/prior_loss"] == 7.3
    assert out["bestrq/train_loss"] == 6.3


def test_a_missing_source_leaves_its_numbers_out():
    out = summary({"evaluate": SOURCES["evaluate"], "finetune": {}, "pretrain": {}})
    assert "wer/ft_stock" not in out and "diff/finetuned" not in out
    assert "bestrq/train_loss" not in out and out["wer/bestrq"] == 23.3
    assert difference_records({"evaluate": {}, "finetune": {}}) == []


def test_plot_records_hold_the_metrics_numbers():
    out = summary(SOURCES)
    wers = wer_records(SOURCES)
    assert [r["system"] for r in wers] == ["zero-shot: stock Whisper",
                                           "zero-shot: BEST-RQ adapter",
                                           "fine-tuned from stock", "fine-tuned from the adapter"]
    assert [r["wer"] for r in wers] == [out["wer/stock"], out["wer/bestrq"],
                                        out["wer/ft_stock"], out["wer/ft_bestrq"]]
    assert wers[0]["low"] == pytest.approx(37.9) and wers[0]["high"] == pytest.approx(47.9)
    diffs = difference_records(SOURCES)
    assert [(r["comparison"], r["difference"], r["low"], r["high"]) for r in diffs] == [
        ("zero-shot", -19.6, -56.2, -0.6), ("fine-tuned", -1.6, -3.7, -0.2)]


def test_committed_run_plot_files_hold_its_metrics():
    # The committed default run: its plot data and its metrics are the same numbers.
    live = REPO / "dvclive" / "report"
    if not (live / "metrics.json").is_file():
        pytest.skip("no committed run in this checkout")
    metrics = flatten(json.loads((live / "metrics.json").read_text()))
    wers = json.loads((live / "plots" / "custom" / "wer.json").read_text())
    assert [r["wer"] for r in wers] == [metrics[k] for k in
                                        ("wer/stock", "wer/bestrq", "wer/ft_stock",
                                         "wer/ft_bestrq")]
    diffs = json.loads((live / "plots" / "custom" / "difference.json").read_text())
    assert [(r["difference"], r["low"], r["high"]) for r in diffs] == [
        (metrics["diff/zero_shot"], metrics["diff/zs_low"], metrics["diff/zs_high"]),
        (metrics["diff/finetuned"], metrics["diff/ft_low"], metrics["diff/ft_high"])]


def test_the_committed_plots_page_is_the_bundle_vl_convert_writes():
    pytest.importorskip("vl_convert")
    from stages.plots_page import PAGE, page_html

    committed = (REPO / PAGE).read_text(encoding="utf-8")
    assert committed == page_html()
    # DVC's CDN scripts are gone ({scripts} would bring them back); its placeholders stay.
    assert "{scripts}" not in committed and "cdn.jsdelivr" not in committed
    assert "{plot_divs}" in committed and "window.vegaEmbed=" in committed
    config = (REPO / ".dvc" / "config").read_text()
    assert "html_template = plots/page.html" in config
