"""The run's last line says what the manifest says."""

from rerank_ray.pipeline import summary_line

MANIFEST = {
    "run_id": "r1",
    "rows_read": 2000,
    "rows_scored": 500,
    "rows_rejected": 2,
    "rows_truncated": 7,
    "rows_filtered": 1498,
    "pairs_per_s": 5.56,
    "wall_time_s": 90.1,
    "output": "s3://b/out/",
}


def test_counts_add_up_to_the_rows_read_and_filtered_rows_are_named():
    line = summary_line(MANIFEST)
    assert "2000 rows read -> 500 scored (7 truncated), 2 rejected, 1498 filtered" in line
    assert "5.56 scored pairs/s" in line and "-> s3://b/out/" in line


def test_no_filtered_count_without_filtered_rows():
    line = summary_line({**MANIFEST, "rows_read": 502, "rows_filtered": 0})
    assert "filtered" not in line
    assert "502 rows read -> 500 scored (7 truncated), 2 rejected;" in line
