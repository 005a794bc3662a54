"""The report: the answer's numbers taken from evaluate's and finetune's summaries, the plot
records that hold them, and the offline page template DVC fills."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bestrq.report import difference_records, flatten, summary, wer_records

REPO = Path(__file__).resolve().parents[1]


def _system(wer: float, errors: float = 10.0) -> dict[str, float]:
    return {"wer": wer, "wer_low": wer - 0.05, "wer_high": wer + 0.05,
            "substitutions": errors, "deletions": errors + 1, "insertions": errors + 2}


def _split(shift: float) -> dict:
    return {"evaluate": {"stock": _system(0.429 + shift),
                         "adapted": {**_system(0.233 + shift), "loss": 7.81, "accuracy": 0.015},
                         "delta": {"wer": -0.196, "wer_low": -0.562, "wer_high": -0.006},
                         "prior": {"loss": 7.30, "accuracy": 0.005}},
            "finetune": {"stock": _system(0.364 + shift), "adapted": _system(0.348 + shift),
                         "delta": {"wer": -0.016, "wer_low": -0.037, "wer_high": -0.002}}}


TEST, DEV = _split(0.0), _split(0.1)
SOURCES = {
    "evaluate": flatten({"test": TEST["evaluate"], "dev": DEV["evaluate"]}),
    "finetune": flatten({"test": TEST["finetune"], "dev": DEV["finetune"]}),
    "pretrain": flatten({"train": {"loss": 6.3}}),
}


def test_flatten_joins_dvclive_nesting_with_slashes():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}


def test_summary_puts_the_test_answer_first_in_wer_points_then_dev():
    out = summary(SOURCES)
    assert list(out)[:10] == ["test/stock", "test/bestrq", "test/ft_stock", "test/ft_bestrq",
                              "test/zs_diff", "test/zs_low", "test/zs_high", "test/ft_diff",
                              "test/ft_low", "test/ft_high"]
    assert out["test/stock"] == 42.9 and out["test/ft_bestrq"] == 34.8
    assert out["dev/stock"] == 52.9 and out["dev/ft_bestrq"] == 44.8
    assert out["test/zs_diff"] == -19.6 and out["test/zs_low"] == -56.2
    assert out["test/ft_diff"] == -1.6 and out["test/ft_high"] == -0.2
    # Every system's interval and S/D/I counts, for both splits.
    assert out["test/wer_low/bestrq"] == 18.3 and out["dev/wer_high/ft_stock"] == 51.4
    assert (out["test/sub/stock"], out["test/del/stock"], out["test/ins/stock"]) == (10, 11, 12)
    assert all(f"{s}/{g}/{n}" in out for s in ("test", "dev")
               for g in ("wer_low", "wer_high", "sub", "del", "ins")
               for n in ("stock", "bestrq", "ft_stock", "ft_bestrq"))
    assert all(f"{s}/{n}" in out for s in ("test", "dev")
               for n in ("stock", "bestrq", "ft_stock", "ft_bestrq"))
    assert out["test/heldout/loss"] == 7.81 and out["dev/heldout/prior_loss"] == 7.3
    assert out["bestrq/train_loss"] == 6.3
    keys = list(out)
    assert max(i for i, k in enumerate(keys) if k.startswith("test/")) < \
        min(i for i, k in enumerate(keys) if k.startswith("dev/"))


def test_each_seeds_difference_is_reported_beside_the_pooled_one():
    finetune = {**SOURCES["finetune"], "test/seed_0/delta/wer": -0.01,
                "test/seed_7/delta/wer": -0.022}
    out = summary({**SOURCES, "finetune": finetune})
    assert out["test/ft_diff_seed_0"] == -1.0 and out["test/ft_diff_seed_7"] == -2.2
    assert out["test/ft_diff"] == -1.6


def test_a_missing_source_leaves_its_numbers_out():
    out = summary({"evaluate": SOURCES["evaluate"], "finetune": {}, "pretrain": {}})
    assert "test/ft_stock" not in out and "test/ft_diff" not in out
    assert "bestrq/train_loss" not in out and out["test/bestrq"] == 23.3
    assert difference_records({"evaluate": {}, "finetune": {}}) == []


def test_plot_records_hold_the_test_metrics_numbers():
    out = summary(SOURCES)
    wers = wer_records(SOURCES)
    assert [r["system"] for r in wers] == ["zero-shot: stock Whisper",
                                           "zero-shot: BEST-RQ adapter",
                                           "fine-tuned from stock", "fine-tuned from the adapter"]
    assert [r["wer"] for r in wers] == [out["test/stock"], out["test/bestrq"],
                                        out["test/ft_stock"], out["test/ft_bestrq"]]
    assert wers[0]["low"] == pytest.approx(37.9) and wers[0]["high"] == pytest.approx(47.9)
    diffs = difference_records(SOURCES)
    assert [(r["comparison"], r["difference"], r["low"], r["high"]) for r in diffs] == [
        ("zero-shot", -19.6, -56.2, -0.6), ("fine-tuned", -1.6, -3.7, -0.2)]
    assert wer_records(SOURCES, "dev")[0]["wer"] == out["dev/stock"]


def test_committed_run_plot_files_hold_its_metrics():
    # The committed default run: its plot data and its metrics are the same numbers.
    live = REPO / "dvclive" / "report"
    if not (live / "metrics.json").is_file():
        pytest.skip("no committed run in this checkout")
    metrics = flatten(json.loads((live / "metrics.json").read_text()))
    wers = json.loads((live / "plots" / "custom" / "wer.json").read_text())
    assert [r["wer"] for r in wers] == [metrics[f"test/{k}"] for k in
                                        ("stock", "bestrq", "ft_stock", "ft_bestrq")]
    assert [(r["low"], r["high"]) for r in wers] == [
        (metrics[f"test/wer_low/{k}"], metrics[f"test/wer_high/{k}"])
        for k in ("stock", "bestrq", "ft_stock", "ft_bestrq")]
    diffs = json.loads((live / "plots" / "custom" / "difference.json").read_text())
    assert [(r["difference"], r["low"], r["high"]) for r in diffs] == [
        (metrics["test/zs_diff"], metrics["test/zs_low"],
         metrics["test/zs_high"]),
        (metrics["test/ft_diff"], metrics["test/ft_low"],
         metrics["test/ft_high"])]


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


def test_every_answer_key_logs_through_dvclive(tmp_path):
    # DVCLive nests "a/b" under "a": a key that is both a number and a group would fail.
    from dvclive import Live

    finetune = {**SOURCES["finetune"], "test/seed_0/delta/wer": -0.01,
                "test/seed_1/delta/wer": -0.02}
    out = summary({**SOURCES, "finetune": finetune})
    with Live(str(tmp_path / "live"), save_dvc_exp=False, dvcyaml=None) as live:
        for key, value in out.items():
            live.log_metric(key, value, plot=False)
    logged = flatten(json.loads((tmp_path / "live" / "metrics.json").read_text()))
    assert logged == out


def test_plot_titles_are_safe_in_dvcs_page():
    # DVC puts a top-level plot's title, made an id, into a quoted JavaScript string of the
    # page: a quote in it stops every chart after it from rendering.
    import yaml

    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    titles = [title for entry in plots for title in (entry if isinstance(entry, dict) else {})]
    assert len(titles) >= 4
    assert not [t for t in titles if set(t) & set("'\"\\<>")]
