"""The planner against the GPU runs recorded in docs/runs/, recomputed from their settings without a GPU
(measure/planner_recorded.py): issue 38's preference rows within the design's target, and no row of the
grids run on today's engine more than 3% under its measurement."""

import importlib.util

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("planner_recorded", REPO_ROOT / "measure" / "planner_recorded.py")
recorded = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recorded)


def _errors(rows: list[dict]) -> dict[str, float]:
    return {" ".join(recorded.describe(r)): p / r["measured"] - 1 for r, p in zip(rows, recorded.predictions(rows))}


def test_every_recorded_preference_row_is_within_ten_percent_and_never_three_under():
    rows = [r for r in recorded.recorded_rows() if r["grid"] in recorded.PREFERENCE]
    errors = _errors(rows)
    assert len(rows) == 39
    assert sum(r["settings"]["cuda_graphs"] for r in rows) == 10  # DPO and ORPO steps replayed as CUDA graphs
    assert all(recorded.UNDER <= e <= recorded.WITHIN for e in errors.values()), errors


def test_no_row_of_the_compiled_engines_sft_grid_is_more_than_three_percent_under():
    rows = [r for r in recorded.recorded_rows() if r["grid"] == recorded.SFT_RECORDED]
    errors = _errors(rows)
    assert len(rows) == 23 and min(errors.values()) >= recorded.UNDER, errors


def test_no_recorded_preference_bench_is_more_than_three_percent_under():
    # the DPO and ORPO benches and recipes as shipped (docs/runs/*.json); the DPO TinyLlama recipe's short last
    # micro-batch, run eagerly beside the graphs' pool, was 19.6% under before the planner counted it; planned
    # since (eager), it measured 1.9% below its prediction (2026-12-07g)
    rows = [r for r in recorded.bench_rows() if r["settings"].get("objective", "sft") != "sft"]
    errors = _errors(rows)
    assert len(rows) == 12 and min(errors.values()) >= recorded.UNDER, errors
