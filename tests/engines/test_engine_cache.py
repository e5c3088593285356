"""The engine cache without TensorRT: keys, stale and corrupt plans, concurrent builders.

A "plan" here is any bytes and "deserialise" any function, exactly as TensorRTEngine hands
them to the cache (build_serialized_network's bytes, Runtime.deserialize_cuda_engine).
"""

import dataclasses
import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from engines.cache import MAGIC, CacheKey, EngineCache, read_entry
from fusion_node.errors import EngineError

KEY = CacheKey(onnx_sha256="ab" * 32, tensorrt_version="10.3.0", gpu_name="Orin",
               compute_capability="8.7", precision="fp16",
               input_shapes=(("input", (1, 576)),))


def _deserialize(plan: bytes) -> bytes | None:
    """Stands in for Runtime.deserialize_cuda_engine: None for a plan it cannot load."""
    return plan if plan.startswith(b"PLAN") else None


class Builds:
    def __init__(self, plan: bytes = b"PLAN-1") -> None:
        self.count = 0
        self.plan = plan

    def __call__(self) -> bytes:
        self.count += 1
        return self.plan


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(CacheKey)])
def test_key_changes_when_any_part_changes(field: str) -> None:
    value = getattr(KEY, field)
    changed = {
        "input_shapes": (("input", (1, 512)),),
    }.get(field, value + "x" if isinstance(value, str) else value)
    other = dataclasses.replace(KEY, **{field: changed})
    assert other.digest() != KEY.digest()
    assert dataclasses.replace(KEY).digest() == KEY.digest()  # and only then


def test_store_then_load_round_trip(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    assert cache.load(KEY) is None
    path = cache.store(KEY, b"PLAN-bytes")
    assert path == tmp_path / f"{KEY.digest()}.plan"
    assert cache.load(KEY) == b"PLAN-bytes"
    header, plan = read_entry(path)
    assert plan == b"PLAN-bytes"
    assert header["key"] == json.loads(KEY.to_json())
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_get_or_build_builds_once_then_hits(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), Builds()
    assert cache.get_or_build(KEY, build, _deserialize) == (b"PLAN-1", True)
    assert cache.get_or_build(KEY, build, _deserialize) == (b"PLAN-1", False)
    assert build.count == 1


def _corruptions(data: bytes) -> dict[str, bytes]:
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    return {
        "truncated": data[:-3],
        "bit flip": bytes(flipped),
        "bad magic": b"x" + data[1:],
        "no header": MAGIC + b"{",
        "empty": b"",
    }


@pytest.mark.parametrize("kind", list(_corruptions(b"PLAN")))
def test_corrupt_plan_is_rebuilt_not_trusted(tmp_path: Path, kind: str) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, b"PLAN-old")
    path.write_bytes(_corruptions(path.read_bytes())[kind])
    build = Builds(b"PLAN-new")
    assert cache.get_or_build(KEY, build, _deserialize) == (b"PLAN-new", True)
    assert build.count == 1
    assert cache.load(KEY) == b"PLAN-new"


def test_plan_of_another_key_is_stale(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    other = dataclasses.replace(KEY, tensorrt_version="10.4.0")
    # An entry copied in from another machine under this key's name.
    cache.store(other, b"PLAN-other").rename(cache.path_for(KEY))
    assert cache.load(KEY) is None
    assert cache.get_or_build(KEY, Builds(b"PLAN-mine"), _deserialize) == (b"PLAN-mine", True)


@pytest.mark.parametrize("rejection", ["returns None", "raises EngineError"])
def test_plan_the_runtime_rejects_is_rebuilt(tmp_path: Path, rejection: str) -> None:
    # "Version tag does not match": the bytes are intact but TensorRT will not load them.
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"OLD-FORMAT")

    def deserialize(plan: bytes) -> bytes | None:
        if plan.startswith(b"OLD") and rejection == "raises EngineError":
            raise EngineError("Version tag does not match")
        return _deserialize(plan)

    assert cache.get_or_build(KEY, Builds(b"PLAN-new"), deserialize) == (b"PLAN-new", True)


def test_a_fresh_plan_that_cannot_load_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="cannot be deserialised"):
        EngineCache(tmp_path).get_or_build(KEY, Builds(b"BROKEN"), _deserialize)


def test_readers_never_see_a_partial_plan(tmp_path: Path) -> None:
    """Writers replace a 4 MB plan over and over while readers load it: every read is a
    whole plan from one writer (atomic rename), never a mix or a truncation."""
    cache = EngineCache(tmp_path)
    plans = [bytes([i]) * (4 << 20) for i in range(3)]
    cache.store(KEY, plans[0])
    stop = threading.Event()
    seen: list[bytes | None] = []

    def write(plan: bytes) -> None:
        while not stop.is_set():
            cache.store(KEY, plan)

    def read() -> None:
        while not stop.is_set():
            seen.append(cache.load(KEY))

    threads = [threading.Thread(target=write, args=(p,)) for p in plans]
    threads += [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    assert seen and all(plan in plans for plan in seen)


def _build_in_process(directory: str, marker: str, queue: multiprocessing.Queue) -> None:
    def build() -> bytes:
        with Path(marker).open("a") as file:  # one line per build, across processes
            file.write("built\n")
        time.sleep(0.3)  # a slow build, so the others arrive while it runs
        return b"PLAN-" + bytes(range(256)) * 1000

    plan, built = EngineCache(directory).get_or_build(KEY, build, _deserialize)
    queue.put((plan, built))


def test_concurrent_builders_build_once_and_agree(tmp_path: Path) -> None:
    cache_dir, marker = tmp_path / "cache", tmp_path / "builds.txt"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_build_in_process, args=(str(cache_dir), str(marker),
                                                               queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert marker.read_text() == "built\n"  # the others waited on the lock, then hit
    assert sorted(built for _, built in results) == [False, False, False, True]
    assert len({plan for plan, _ in results}) == 1
    assert EngineCache(cache_dir).load(KEY) == results[0][0]
