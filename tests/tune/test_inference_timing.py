"""How the summary's inference figures were measured, without Ray: the count of trials that
shared a trial's node while it was timed during training, the label that says so, and the
end-of-run evaluation's figures (each trial timed alone) taking their place."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.tune.summary import (
    MEASURED_ALONE,
    SUMMARY_COLUMNS,
    apply_evaluation_timing,
    build_final_summary,
    concurrent_trials,
    format_table,
    rankings,
    write_summary_files,
)

# Four trials on node "a" and one on node "b", epoch seconds. mit_b0 is timed over [100, 102].
INFOS = {
    "mit_b0": {"node_id": "a", "fit_started_at": 0.0, "train_finished_at": 103.0,
               "infer_window": [100.0, 102.0]},
    # Running through the whole window.
    "mit_b1": {"node_id": "a", "fit_started_at": 1.0, "train_finished_at": 500.0,
               "infer_window": [490.0, 495.0]},
    # Failed in the middle of the window: it still shared the first part.
    "mit_b2": {"node_id": "a", "fit_started_at": 2.0, "failed_at": 101.0},
    # Finished before the window: shared nothing with it.
    "mit_b4": {"node_id": "a", "fit_started_at": 3.0, "train_finished_at": 99.0,
               "infer_window": [97.0, 98.0]},
    # Another node: shares no core, whatever its times.
    "mit_b5": {"node_id": "b", "fit_started_at": 0.0, "train_finished_at": 600.0,
               "infer_window": [590.0, 599.0]},
}


def _others_during(trial: str) -> int:
    """Worked out by hand from INFOS above, trial by trial."""
    return {"mit_b0": 2,  # mit_b1 and mit_b2
            "mit_b1": 0,  # [490, 495]: everyone else on node a had ended
            "mit_b4": 3,  # [97, 98]: mit_b0, mit_b1, mit_b2
            "mit_b5": 0}[trial]


@pytest.mark.parametrize("trial", ["mit_b0", "mit_b1", "mit_b4", "mit_b5"])
def test_counts_only_the_trials_running_on_the_node_in_the_window(trial):
    assert concurrent_trials(trial, INFOS) == _others_during(trial)


def test_a_trial_with_no_recorded_end_counts_if_it_started_before_the_window_ended():
    infos = {"x": {"node_id": "a", "infer_window": [10.0, 20.0]},
             "killed": {"node_id": "a", "fit_started_at": 5.0},
             "later": {"node_id": "a", "fit_started_at": 21.0},
             "never": {"node_id": "a"}}
    assert concurrent_trials("x", infos) == 1


def test_no_window_recorded_means_unknown():
    assert concurrent_trials("mit_b2", INFOS) is None


def _row(trial: str, ms: float | None, measured: str | None, concurrent: int | None) -> dict:
    return {"trial": trial, "backbone": trial, "status": "completed", "params": 27.8e6,
            "epochs_completed": 2, "best_loss": 1.0, "best_epoch": 1, "map": None,
            "map50": None, "best_map": 0.5, "best_map50": 0.7, "best_map_epoch": 2,
            "train_images_per_sec": 1.0, "infer_ms_per_image": ms,
            "fps": None if ms is None else 1000.0 / ms, "inference_measured": measured,
            "inference_concurrent_trials": concurrent,
            "infer_ms_per_image_during_training": ms, "device": "cpu", "node": "host",
            "error": None}


def _summary(rows: list[dict]) -> dict:
    return {"results": rows, "rankings": rankings(rows), "num_succeeded": len(rows),
            "num_trials": len(rows), "num_failed": 0, "total_wall_time_sec": 1.0}


def _shared(trial, ms, concurrent=4):
    return _row(trial, ms, f"during training, shared with {concurrent} concurrent trials on "
                           "its node", concurrent)


def test_the_evaluations_figures_replace_the_shared_ones_and_rerank():
    # Shared cores made mit_b0 look slower than mit_b5 (the 1022 vs 883 ms).
    summary = _summary([_shared("mit_b0", 1022.0), _shared("mit_b5", 883.0),
                        _shared("mit_b1", 950.0)])
    assert summary["rankings"]["inference_ms_per_image"] == ["mit_b5", "mit_b1", "mit_b0"]
    evaluation = [
        {"trial": "mit_b0", "status": "ok", "infer_ms_per_image": 40.0, "fps": 25.0},
        {"trial": "mit_b5", "status": "ok", "infer_ms_per_image": 200.0, "fps": 5.0},
        # The evaluation could not time mit_b1: its training figure stays, labelled shared.
        {"trial": "mit_b1", "status": "failed", "infer_ms_per_image": None, "fps": None,
         "error": "timing: boom"},
    ]
    apply_evaluation_timing(summary, evaluation)
    b0, b5, b1 = summary["results"]
    assert (b0["infer_ms_per_image"], b0["fps"], b0["inference_measured"]) == (
        40.0, 25.0, MEASURED_ALONE)
    assert (b5["infer_ms_per_image"], b5["fps"], b5["inference_measured"]) == (
        200.0, 5.0, "alone (evaluation)")
    assert b0["inference_concurrent_trials"] == b5["inference_concurrent_trials"] == 0
    # What training measured is kept beside it.
    assert (b0["infer_ms_per_image_during_training"],
            b5["infer_ms_per_image_during_training"]) == (1022.0, 883.0)
    assert (b1["infer_ms_per_image"], b1["inference_measured"]) == (
        950.0, "during training, shared with 4 concurrent trials on its node")
    assert summary["rankings"]["inference_ms_per_image"] == ["mit_b0", "mit_b5", "mit_b1"]


def _line(table: str, start: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(start))


def _cell(table: str, trial: str, column: str) -> str:
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    row = [c.strip() for c in _line(table, f"| {trial}").strip("|").split("|")]
    return row[header.index(column)]


def test_the_printed_ranking_says_the_figures_were_taken_alone():
    summary = apply_evaluation_timing(
        _summary([_shared("mit_b0", 1022.0), _shared("mit_b5", 883.0)]),
        [{"trial": "mit_b0", "status": "ok", "infer_ms_per_image": 40.0, "fps": 25.0},
         {"trial": "mit_b5", "status": "ok", "infer_ms_per_image": 200.0, "fps": 5.0}])
    table = format_table(summary)
    assert _line(table, "Inference ranking") == (
        "Inference ranking (ms/image, fastest first; each trial timed alone by the "
        "evaluation): mit_b0 > mit_b5")
    assert float(_cell(table, "mit_b0", "ms/img infer")) == 40.0


def test_shared_figures_are_marked_in_the_table_and_the_ranking():
    table = format_table(_summary([_shared("mit_b0", 1022.0, 4), _shared("mit_b5", 883.0, 3)]))
    assert _line(table, "Inference ranking") == (
        "Inference ranking (ms/image, fastest first; timed at the end of training while up "
        "to 4 other trials shared the node: not comparable; experiments/evaluate.py times "
        "each alone): mit_b5 > mit_b0")
    assert _cell(table, "mit_b0", "ms/img infer") == "1022.0*"


def test_a_mixed_table_names_the_shared_ones_with_a_star():
    rows = [_row("mit_b0", 40.0, MEASURED_ALONE, 0), _shared("mit_b1", 900.0, 1)]
    table = format_table(_summary(rows))
    assert "; * = timed at the end of training while up to 1 other trials" in table
    assert float(_cell(table, "mit_b0", "ms/img infer")) == 40.0
    assert _cell(table, "mit_b1", "ms/img infer") == "900.0*"


def test_training_alone_is_not_called_shared():
    table = format_table(_summary([_row("mit_b0", 50.0, "during training, no other trial "
                                        "running on its node", 0)]))
    assert "timed at the end of training, no other trial running): mit_b0" in table


def _write_trial(root, name, info, epochs=2):
    storage = RunStorage.from_uri(str(root)).child(name)
    storage.write_text("logs/training_info.json", json.dumps(info))
    rows = pd.DataFrame({"epoch": range(1, epochs + 1), "avg_loss": [1.0, 0.5][:epochs],
                         "epoch_time_sec": [1.0] * epochs, "images_per_sec": [2.0] * epochs,
                         "map": [0.1, 0.2][:epochs]})
    storage.write_text("logs/epoch_metrics.csv", rows.to_csv(index=False))


def test_the_summary_files_carry_the_label_and_the_substitution(tmp_path):
    """From the trials' own files to final_summary.json and summary.csv, then the evaluation."""
    names = ["mit_b0", "mit_b4"]
    storage = RunStorage.from_uri(str(tmp_path))
    storage.write_text("run_config.json", json.dumps(
        {"trials": [{"name": n, "backbone": n, "lr": 0.005} for n in names]}))
    common = {"status": "completed", "best_epoch": 2, "best_loss": 0.5, "fps": 1.0}
    _write_trial(tmp_path, "mit_b0", {**common, **INFOS["mit_b0"], "infer_ms_per_image": 1022.0})
    _write_trial(tmp_path, "mit_b4", {**common, **INFOS["mit_b4"], "infer_ms_per_image": 883.0})
    summary = build_final_summary(storage, {}, {}, 1.0)
    write_summary_files(storage, summary)
    saved = json.loads((tmp_path / "final_summary.json").read_text())
    by_trial = {r["trial"]: r for r in saved["results"]}
    # INFOS without mit_b1, mit_b2, mit_b5: in mit_b0's window [100, 102] no other trial of
    # this run ran (mit_b4 ended at 99); in mit_b4's [97, 98] mit_b0 did.
    assert by_trial["mit_b0"]["inference_concurrent_trials"] == 0
    assert by_trial["mit_b4"]["inference_measured"] == (
        "during training, shared with 1 concurrent trial on its node")
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert list(csv.columns) == list(SUMMARY_COLUMNS)
    assert list(csv["inference_measured"]) == [
        "during training, no other trial running on its node",
        "during training, shared with 1 concurrent trial on its node"]

    apply_evaluation_timing(summary, [
        {"trial": "mit_b0", "status": "ok", "infer_ms_per_image": 30.0, "fps": 1000 / 30},
        {"trial": "mit_b4", "status": "ok", "infer_ms_per_image": 120.0, "fps": 1000 / 120}])
    write_summary_files(storage, summary)
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert list(csv["infer_ms_per_image"]) == [30.0, 120.0]
    assert list(csv["infer_ms_per_image_during_training"]) == [1022.0, 883.0]
    assert set(csv["inference_measured"]) == {MEASURED_ALONE}
    saved = json.loads((tmp_path / "final_summary.json").read_text())
    assert saved["rankings"]["inference_ms_per_image"] == ["mit_b0", "mit_b4"]
