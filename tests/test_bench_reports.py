"""The benchmark JSON reports keep the keys their consumers rely on (full runs are too slow for tests)."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.bench_anomaly import DEFECT_CLASSES, _class_rows
from analysis.bench_columns import _row, format_report
from simulator.specimen import LABEL_CODE


def test_anomaly_rows_have_the_documented_keys() -> None:
    labels = [np.array([0, 0, 0, LABEL_CODE["vacancy"], LABEL_CODE["domain_wall"], 0])]
    scores = [np.array([0.1, 0.2, 0.3, 5.0, 0.25, 0.4])]
    rows = _class_rows("gae", scores, labels)
    assert [row["defect_class"] for row in rows] == list(DEFECT_CLASSES)
    vacancy = next(row for row in rows if row["defect_class"] == "vacancy")
    assert vacancy["auroc"] == 1.0 and vacancy["average_precision"] == 1.0
    assert set(rows[0]) >= {"scorer", "defect_class", "auroc", "average_precision"}
    strained = next(row for row in rows if row["defect_class"] == "strained")
    assert strained["auroc"] is None  # no positives: no figure, rather than a made-up one


def test_column_rows_pool_tiles_and_format() -> None:
    score = {"recall": 1.0, "precision": 0.5, "rms_px": 0.1, "rms_a_px": 0.05, "rms_b_px": 0.2,
             "species_accuracy": 1.0, "found": 10, "true": 10}  # fmt: skip
    other = {**score, "rms_px": 0.3, "precision": 1.0}
    row = _row("peaks", 512, 32.0, 1e5, [score, other], [0.1, 0.3])
    assert set(row) >= {"method", "default_dose", "size_px", "dose", "recall", "precision", "rms_px",
                        "species_accuracy", "seconds"}  # fmt: skip
    assert row["default_dose"] is True
    assert row["rms_px"] == np.sqrt((0.1**2 + 0.3**2) / 2)
    assert row["precision"] == 0.75
    report = {"rows": [row], "merge_500k": {"graph_nodes": 500_000, "median_s": 0.01, "target_s": 0.05}}
    assert "peaks" in format_report(report)


def test_guidance_report_areas_and_table() -> None:
    from analysis.bench_guidance import _area_under
    from analysis.bench_guidance import format_report as format_guidance

    curve = [{"tiles": 1.0, "imaged_fraction": 0.5}, {"tiles": 2.0, "imaged_fraction": 1.0}]
    # Fractions of a 4-tile grid: (0, 0), (0.25, 0.5), (0.5, 1.0) -> area 0.0625 + 0.1875 = 0.25 over 0.5.
    assert _area_under(curve, 4, "imaged_fraction", 0.5) == 0.5
    rows = [
        {
            "policy": "guided",
            "layout": "default",
            "seed": 0,
            "budget_fraction": 0.25,
            "imaged_fraction": 0.5,
            "detected_fraction": 0.25,
        }
    ]
    report = {
        "rows": rows,
        "areas": {"guided/default": 0.4},
        "latency": {"median_step_s": 0.1, "p95_step_s": 0.2, "steps": 10},
    }
    text = format_guidance(report)
    assert "0.50/-/0.25" in text and "median 0.100 s" in text


def test_guidance_targets_are_checked_against_the_rows() -> None:
    from analysis.bench_guidance import format_report as format_guidance
    from analysis.bench_guidance import target_results

    def row(policy: str, imaged: float, seed: int, layout: str = "default") -> dict:
        return {"policy": policy, "layout": layout, "seed": seed, "budget_fraction": 0.25,
                "imaged_fraction": imaged, "detected_fraction": 0.0}  # fmt: skip

    rows = [row("guided", 0.9, 0), row("guided", 0.72, 1), row("image_gp", 0.4, 0), row("image_gp", 0.8, 1)]
    rows.append(row("guided", 0.0, 100, "control"))  # the control layout does not count
    results = target_results(rows, 0.16)
    assert results["guided_imaged_at_25"] == {"target": 0.84, "measured": pytest.approx(0.81), "met": False}
    assert results["guided_over_image_gp_at_25"]["measured"] == pytest.approx(0.81 / 0.6)
    assert results["guided_over_image_gp_at_25"]["met"] is True
    assert results["median_step_s"] == {"target": 0.15, "measured": 0.16, "met": False}
    missing = target_results([row("guided", 0.9, 0)], None)
    assert missing["guided_over_image_gp_at_25"]["met"] is None
    assert missing["median_step_s"]["measured"] is None
    report = {"rows": rows, "areas": {}, "latency": {"median_step_s": None}, "target_results": results}
    text = format_guidance(report)
    assert "target guided_imaged_at_25: 0.84, measured 0.810: NOT met" in text
    assert "target median_step_s: 0.15, measured 0.160: NOT met" in text


def test_family_targets_judge_strict_scoring_ablations_late_rate_and_calibration() -> None:
    from analysis.bench_guidance import format_report as format_guidance
    from analysis.bench_guidance import target_results

    def row(policy: str, imaged: float, strict: float, seed: int) -> dict:
        return {"policy": policy, "layout": "family", "seed": seed, "budget_fraction": 0.25,
                "imaged_fraction": imaged, "strict_imaged_fraction": strict,
                "detected_fraction": 0.0}  # fmt: skip

    rows = [row("guided", 0.9, 0.75, s) for s in range(9)] + [row("guided", 0.5, 0.4, 9)]
    rows += [row("random", 0.5, 0.2, s) for s in range(10)] + [row("no_gp", 0.7, 0.5, s) for s in range(10)]
    late = {"guided/family": {"mean": 0.3, "std": 0.1}, "random/family": {"mean": 0.25, "std": 0.1}}
    calibration = {"guided/family": {"tiles": 100, "within_68": 0.66, "within_95": 0.999}}
    results = target_results(rows, 0.1, late, calibration)
    assert results["family_guided_imaged_at_25"]["measured"] == pytest.approx(0.86)
    assert results["family_guided_imaged_at_25"]["met"] is True
    assert results["family_guided_strict_imaged_at_25"]["measured"] == pytest.approx(0.715)
    # Nine seeds at 0.9 and one at 0.5: the 10th percentile interpolates between them.
    assert results["family_guided_worst_decile_at_25"]["measured"] == pytest.approx(0.86)
    assert results["family_guided_over_random_at_25"]["measured"] == pytest.approx(1.72)
    assert results["family_guided_over_no_gp_at_25"]["measured"] == pytest.approx(0.86 / 0.7)
    assert results["family_guided_late_rate_over_random"] == {"target": 1.5, "measured": 1.2, "met": False}
    assert results["family_calibration_within_68"]["met"] is True
    assert results["family_calibration_within_95"]["met"] is False  # over-wide intervals miss too
    # The default-layout targets are not measured without default rows.
    assert results["guided_imaged_at_25"]["measured"] is None
    text = format_guidance(
        {"rows": rows, "areas": {}, "latency": {"median_step_s": None}, "late_rate": late,
         "calibration": calibration, "target_results": results}
    )  # fmt: skip
    assert "target family_calibration_within_68: 0.61-0.75, measured 0.660: met" in text
    assert "calibration guided/family: 66% of 100 new tiles inside the 68 % predictive interval" in text
