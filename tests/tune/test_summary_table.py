"""The printed cross-backbone table's ranking lines."""

from __future__ import annotations

from crossdet_ray.tune.summary import format_table, rankings


def _row(trial: str, map_value, images_per_sec) -> dict:
    return {"trial": trial, "status": "completed", "params": 27.8e6, "epochs_completed": 2,
            "best_loss": 1.0, "best_epoch": 1, "map": None, "map50": None,
            "best_map": map_value, "best_map50": map_value, "best_map_epoch": 2,
            "train_images_per_sec": images_per_sec, "infer_ms_per_image": 10.0,
            "device": "cpu", "node": "host", "error": None}


def _summary(rows: list[dict]) -> dict:
    return {"results": rows, "rankings": rankings(rows), "num_succeeded": len(rows),
            "num_trials": len(rows), "num_failed": 0, "total_wall_time_sec": 1.0}


def test_ties_are_shown_as_ties_not_as_an_order():
    rows = [_row("mit_b0", 0.0, 2.0), _row("mit_b1", 0.0, 1.5), _row("mit_b2", 0.0, 1.5)]
    table = format_table(_summary(rows))
    assert "Accuracy ranking (best test mAP, each trial at its best-mAP epoch): mit_b0 = mit_b1 = mit_b2" in table
    assert "Speed ranking (train img/s): mit_b0 > mit_b1 = mit_b2" in table


def test_distinct_values_rank_best_first_and_missing_ones_are_left_out():
    rows = [_row("mit_b0", 0.2, 2.0), _row("mit_b1", 0.4, 1.0), _row("mit_b2", None, None)]
    table = format_table(_summary(rows))
    assert "Accuracy ranking (best test mAP, each trial at its best-mAP epoch): mit_b1 > mit_b0\n" in table
    assert "Speed ranking (train img/s): mit_b0 > mit_b1\n" in table


def test_no_ranked_trial_prints_a_dash():
    table = format_table(_summary([_row("mit_b0", None, None)]))
    assert "Accuracy ranking (best test mAP, each trial at its best-mAP epoch): -" in table


def test_both_bests_are_shown_with_their_epochs():
    row = {**_row("mit_b0", 0.61234, 2.0), "best_loss": 0.25, "best_epoch": 4,
           "best_map_epoch": 3, "best_map50": 0.9}
    table = format_table(_summary([row]))
    line = next(line for line in table.splitlines() if line.startswith("| mit_b0"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert cells[header.index("best loss (ep)")] == "0.2500 (4)"
    assert cells[header.index("best mAP (ep)")] == "0.6123 (3)"
    assert float(cells[header.index("mAP50 (best mAP ep)")]) == 0.9
