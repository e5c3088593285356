"""The engine cache: serialised TensorRT plans keyed by everything that makes a plan valid.

A plan is only valid for the exact ONNX bytes, TensorRT version, GPU model, compute capability,
precision, fixed input shapes, calibration set, builder settings and CUDA versions it was
built with; a plan built elsewhere fails to deserialise ("Version tag does not match") or,
worse, runs slowly. The key names all
of them, so a change of any part simply misses the cache and builds a new plan.

Each entry is one file, `<digest>.plan`: a magic line, a JSON header line (the key, the plan's
size and SHA-256) and the plan bytes. It is written to a temporary file in the same directory
and renamed into place, so a reader sees a whole entry or none; a lock file per key makes a
second builder wait for the first instead of building the same plan twice. An entry that is
truncated, altered or for another key is reported and rebuilt, never trusted.

No TensorRT or CUDA import here: the cache is plain files and is tested without a GPU.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from fusion_node.errors import EngineError

log = logging.getLogger(__name__)

MAGIC = b"fusion-node engine plan v1\n"
# A header is a few hundred bytes; anything longer is not one of ours.
_MAX_HEADER = 64 * 1024

T = TypeVar("T")


@dataclass(frozen=True)
class CacheKey:
    """Everything a serialised plan depends on. `input_shapes` are the fixed shapes of the
    optimisation profile; `calibration_sha256` is empty unless the plan is int8-calibrated;
    `builder_settings` names how the builder was configured (a digest of the backend's
    settings, so changing them rebuilds); `cuda_versions` the cuda-python and driver versions
    (a driver update may change kernels and tactics)."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    calibration_sha256: str = ""
    builder_settings: str = ""
    cuda_versions: str = ""

    def digest(self) -> str:
        """32 hex digits of SHA-256 over the key's canonical JSON: the entry's file name."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:32]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/fusion-node/engines`, else `~/.cache/fusion-node/engines`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fusion-node" / "engines"


class EngineCache:
    """A directory of plans; safe to share between processes building at the same time."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path_for(self, key: CacheKey) -> Path:
        return self.directory / f"{key.digest()}.plan"

    def load(self, key: CacheKey) -> bytes | None:
        """The plan stored for `key`, or None if there is none or it is stale or corrupt
        (logged with the reason)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("engine cache %s: unreadable (%s); rebuilding", path, exc)
            return None
        try:
            header, plan = parse_entry(data)
        except EngineError as exc:
            log.warning("engine cache %s: %s; rebuilding", path, exc)
            return None
        if header.get("key") != json.loads(key.to_json()):
            log.warning("engine cache %s: built for another key %s; rebuilding", path,
                        header.get("key"))
            return None
        return plan

    def store(self, key: CacheKey, plan: bytes) -> Path:
        """Write `plan` for `key` atomically (temporary file, fsync, rename); returns its path."""
        path = self.path_for(key)
        header = {
            "key": json.loads(key.to_json()),
            "plan_bytes": len(plan),
            "plan_sha256": hashlib.sha256(plan).hexdigest(),
        }
        entry = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + plan
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.",
                                        suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(entry)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        # The rename itself must survive a power cut, or the entry could vanish on reboot.
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path

    def get_or_build(
        self, key: CacheKey, build: Callable[[], bytes], deserialize: Callable[[bytes], T | None]
    ) -> tuple[T, bool]:
        """The deserialised engine for `key` and whether it was built now.

        A cached plan that `deserialize` rejects (returns None or raises EngineError: another
        TensorRT build, a driver update) is rebuilt like a missing one; only a plan that was
        just built and still cannot be deserialised raises EngineError.
        """
        with self._locked(key):
            plan = self.load(key)
            if plan is not None:
                try:
                    engine = deserialize(plan)
                except EngineError as exc:
                    log.warning("engine cache %s: %s; rebuilding", self.path_for(key), exc)
                    engine = None
                if engine is not None:
                    return engine, False
                log.warning("engine cache %s: the runtime rejected the plan; rebuilding",
                            self.path_for(key))
            plan = build()
            self.store(key, plan)
            engine = deserialize(plan)
            if engine is None:
                raise EngineError(f"engine plan for {key}: built, but cannot be deserialised")
            return engine, True

    @contextmanager
    def _locked(self, key: CacheKey) -> Iterator[None]:
        # flock is released by the kernel if the holder dies, so a crashed build never
        # leaves the key locked.
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"{key.digest()}.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def parse_entry(data: bytes) -> tuple[dict, bytes]:
    """Split a cache entry into its header and plan; EngineError says what is wrong."""
    if not data.startswith(MAGIC):
        raise EngineError("not a fusion-node engine plan (bad magic)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if end < 0:
        raise EngineError("header missing or too long")
    try:
        header = json.loads(data[len(MAGIC):end])
    except ValueError as exc:
        raise EngineError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise EngineError("header is not a JSON object")
    plan = data[end + 1:]
    if len(plan) != header.get("plan_bytes"):
        raise EngineError(f"plan is {len(plan)} bytes, header says {header.get('plan_bytes')} "
                          "(truncated?)")
    if hashlib.sha256(plan).hexdigest() != header.get("plan_sha256"):
        raise EngineError("plan bytes do not match their SHA-256 (corrupt)")
    return header, plan


def read_entry(path: str | Path) -> tuple[dict, bytes]:
    """Header and plan of the cache entry at `path` (for `fusion-node engine info`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EngineError(f"engine plan {path}: cannot read: {exc}") from exc
    try:
        return parse_entry(data)
    except EngineError as exc:
        raise EngineError(f"engine plan {path}: {exc}") from None
