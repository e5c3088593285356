"""The project's one error hierarchy: every error names the thing and the bad value."""


class FusionError(Exception):
    """Base of every error fusion-node raises on purpose."""


class ConfigError(FusionError):
    """A launch file or engine setting is invalid."""


class ProtocolError(FusionError):
    """A wire message is malformed; `reason` is a short stable key for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class DriverError(FusionError):
    """A sensor driver cannot open, read or stamp its device."""


class EngineError(FusionError):
    """A model cannot be loaded or run."""


class MissingStreamError(FusionError):
    """A required stream has no usable data for a window."""

    def __init__(self, stream: str, reason: str) -> None:
        super().__init__(f"stream {stream!r} missing: {reason}")
        self.stream = stream
        self.reason = reason


class EndOfStream(FusionError):
    """A finite source (a file, a log) has no more samples."""


class ReplayError(FusionError):
    """A log cannot be written, read, recovered, replayed or verified."""


class RunError(FusionError):
    """A run of the node ended without producing what its launch file asks for."""


class CalibrationError(FusionError):
    """A calibration file, or the data a calibration is estimated from, is unusable."""


# What an optional part's import or load raises when it is missing or of another version:
# not installed, a shared library absent, or an attribute a release removed (OpenCV 5.1's
# cv2.dnn.ENGINE_CLASSIC, TensorRT 8's IProgressMonitor).
LOAD_FAILURES = (ImportError, OSError, AttributeError)


def load_failure(part: str, exc: BaseException, remedy: str) -> ConfigError:
    """One line naming the optional part that cannot load, why, and what to do."""
    return ConfigError(f"{part} cannot load ({type(exc).__name__}: {exc}); {remedy}")
