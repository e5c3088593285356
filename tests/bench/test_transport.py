"""The transport bench runs end to end and reports well-formed numbers (never checks speed)."""

from __future__ import annotations

import json
import math

from fusion_node.bench.transport import (
    FRAME_PATHS,
    FRAME_SHAPES,
    KINDS,
    run_frame_bench,
    run_transport_bench,
    zenoh_available,
)


def test_transport_bench_reports_every_kind_and_path() -> None:
    result = run_transport_bench(count=100, warmup=10, frames=False)
    json.dumps(result, allow_nan=False)  # one plain JSON object
    assert result["bench"] == "transport"
    assert result["count"] == 100 and result["warmup"] == 10
    assert result["endpoint"] == "ipc"
    assert set(result["kinds"]) == set(KINDS)
    for kind, report in result["kinds"].items():
        assert report["payload_bytes"] > 0 and report["interval_us"] > 0
        for path in ("ours", "raw"):
            stats = report[path]
            # Paced sends over ipc with an unlimited high-water mark: nothing is dropped.
            assert stats["count"] == 100, (kind, path)
            assert 0 < stats["p50_us"] <= stats["p99_us"], (kind, path)
            assert math.isfinite(stats["p99_us"])
        for ratio in ("ratio_p50", "ratio_p99"):
            assert math.isfinite(report[ratio]) and report[ratio] > 0
    assert result["kinds"]["frame"]["payload_bytes"] == 640 * 480 * 3


def test_frame_bench_reports_every_path_and_subscriber_count() -> None:
    """Every contender (Zenoh SHM where eclipse-zenoh is installed), 1 and 3 subscriber
    processes, latency per round, throughput with the share delivered intact."""
    result = run_frame_bench(count=20, warmup=2, rounds=2)
    json.dumps(result, allow_nan=False)
    paths = result["paths"]
    assert set(paths) <= set(FRAME_PATHS) and {"raw", "ours", "shm", "shm_loan"} <= set(paths)
    assert ("zenoh_shm" in paths) == zenoh_available()
    for group, receivers in (("1_subscriber", 1), ("3_subscribers", 3)):
        sizes = result[group]["sizes"]
        assert set(sizes) == set(FRAME_SHAPES)
        for entry in sizes.values():
            for path in paths:
                stats = entry[path]
                # Lost shared-memory frames would be counted under "rejected", not hidden.
                lost = sum(result[group]["rejected"].values())
                assert stats["count"] + lost >= 20 * receivers, (group, path)
                assert 0 < stats["p50_us"] <= stats["p99_us"]
                assert len(stats["p50_us_by_round"]) == 2
                assert stats["throughput_fps"] > 0 and 0 < stats["delivered_intact"] <= 1
                # Never a frame whose bytes changed under its receiver.
                assert stats["overwritten"] == 0, (group, path)
            for path in paths[1:]:
                assert entry[f"{path}_vs_raw"]["latency_ratio_p50"] > 0
            if "zenoh_shm" in paths:
                assert entry["shm_loan_vs_zenoh_shm"]["latency_ratio_p50"] > 0
        assert result[group]["shm_fallbacks"] == 0
    if "zenoh_shm" in paths:
        assert set(result["acceptance"]) >= {"loan_vs_zenoh_p50_1_subscriber",
                                             "loan_vs_zenoh_throughput_3_subscribers",
                                             "overwritten_delivered"}
