"""The collector-pause counters reported on node.health."""

import gc

from fusion_node.host.gc_pauses import GcPauses


def test_collections_are_counted_per_generation_while_installed():
    pauses = GcPauses()
    pauses.install()
    pauses.install()  # idempotent: one callback, each collection counted once
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        pauses.remove()
    summary = pauses.summary()
    assert summary["gen2"]["collections"] == 1 and summary["gen0"]["collections"] >= 1
    assert 0 < summary["gen2"]["max_ms"] <= summary["gen2"]["total_ms"] + 1e-3
    gc.collect(2)  # removed: no longer counted
    assert pauses.summary()["gen2"]["collections"] == 1
