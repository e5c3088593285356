"""`fusion-node calibrate camera|av-offset|clock` and `fusion-node bench clock`."""

from __future__ import annotations

import argparse
import os
import threading
from typing import TYPE_CHECKING, Any

from fusion_node.cli.files import add_force, check_output
from fusion_node.errors import CalibrationError

if TYPE_CHECKING:
    from fusion_node.calibration import AvOffset


def add_calibrate_parser(commands: Any) -> None:
    calibrate = commands.add_parser("calibrate", help="estimate camera intrinsics, the "
                                    "audio-video offset or a remote clock mapping")
    which = calibrate.add_subparsers(dest="what", required=True)
    camera = which.add_parser("camera", help="checkerboard calibration (OpenCV)")
    camera.add_argument("source", metavar="IMAGES_OR_VIDEO",
                        help="folder of images, a quoted glob, an image or a video file")
    camera.add_argument("--board", default="9x6", help="inner corners COLSxROWS (default 9x6)")
    camera.add_argument("--square-mm", type=float, default=25.0, help="square size in mm")
    camera.add_argument("--name", default="camera", help="camera_name in the written file")
    camera.add_argument("--out", metavar="FILE", help="write the camera_info YAML here")
    add_force(camera)
    av = which.add_parser("av-offset", help="audio-video offset from a recorded clap or "
                          "flash + beep, or from the speech model's lip-voice synchrony")
    av.add_argument("log", metavar="LOG.mcap")
    av.add_argument("--method", choices=("clap", "sync"), default="clap",
                    help="clap: a visible and audible event (default); sync: the speech "
                    "model's audio-visual synchrony on a log of the visible person talking")
    av.add_argument("--audio", help="audio stream (default: the log's first)")
    av.add_argument("--video", help="camera stream (default: the log's first)")
    av.add_argument("--max-shift-ms", type=float,
                    help="largest offset searched (default: 500 for clap, 200 for sync)")
    av.add_argument("--mouth-roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"),
                    help="sync: the mouth region in pixels (default: the recording node's "
                    "speech engine's, else the default launch file's)")
    av.add_argument("--model", help="sync: the speech ONNX model (default: the shipped "
                    "engines/models/speech.onnx)")
    av.add_argument("--out", metavar="CALIBRATION.yaml",
                    help="store the offset in this robot calibration file")
    av.add_argument("--min-confidence", type=float,
                    help="refuse (exit 1, nothing written) below this confidence (default: "
                    f"{MIN_CONFIDENCE['clap']} for clap, {MIN_CONFIDENCE['sync']} for sync)")
    clock = which.add_parser("clock", help="estimate a remote clock's offset and drift")
    clock.add_argument("endpoint", help="the remote `python -m fusion_node.remote_clock "
                       "serve` endpoint")
    # --duration as every other command spells it; --duration-s, its old name, still works.
    clock.add_argument("--duration", "--duration-s", dest="duration_s", type=float,
                       default=10.0, help="seconds of clock exchanges (default 10)")


def run_calibrate_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run one calibration; the report as a dict (the CLI prints it as JSON)."""
    if args.what == "camera":
        return _camera(args)
    if args.what == "av-offset":
        return _av_offset(args)
    return _clock(args)


def _camera(args: argparse.Namespace) -> dict[str, Any]:
    from fusion_node.calibration import calibrate_camera, parse_board, save_camera_info

    check_output(args.out, args.force, "calibrate camera --out")
    result = calibrate_camera(args.source, parse_board(args.board), args.square_mm, args.name)
    if args.out:
        save_camera_info(args.out, result.info)
    info = result.info
    return {"reprojection_error_px": round(result.rms_px, 4), "fx": info.fx, "fy": info.fy,
            "cx": info.cx, "cy": info.cy, "distortion": info.distortion,
            "width": info.width, "height": info.height, "views_used": len(result.used),
            "failed_detection": result.failed, "written": args.out}


# Below these, an estimate is noise, not a result. Measured here: clap 0.985-0.99 on clap
# logs and 0.067 on a log with no clap; sync 0.178-0.194 on logs of the visible person
# talking and 0.084 on one without.
MIN_CONFIDENCE = {"clap": 0.3, "sync": 0.12}


def _check_confidence(args: argparse.Namespace, confidence: float) -> None:
    least = MIN_CONFIDENCE[args.method] if args.min_confidence is None else args.min_confidence
    if confidence < least:
        raise CalibrationError(
            f"calibrate av-offset: confidence {confidence} is below {least} ({args.method}): "
            f"{args.log} holds no clear {'clap' if args.method == 'clap' else 'speech'} to "
            "measure; nothing was written")


def _av_offset(args: argparse.Namespace) -> dict[str, Any]:
    from fusion_node.calibration import AvOffset, estimate_av_offset

    if args.method == "sync":
        return _sync_offset(args)
    estimate = estimate_av_offset(args.log, args.audio, args.video,
                                  500.0 if args.max_shift_ms is None else args.max_shift_ms)
    _check_confidence(args, estimate.confidence)
    _store_av_offset(args.out, AvOffset(estimate.audio, estimate.video, estimate.offset_ns))
    return {"method": "clap", "audio": estimate.audio, "video": estimate.video,
            "offset_ms": estimate.offset_ns / 1e6, "confidence": estimate.confidence,
            "events": estimate.events, "written": args.out}


def _sync_offset(args: argparse.Namespace) -> dict[str, Any]:
    from fusion_node.av_sync import DEFAULT_SPEECH_MODEL, estimate_sync_offset
    from fusion_node.calibration import AvOffset

    estimate = estimate_sync_offset(
        args.log, args.audio, args.video,
        200.0 if args.max_shift_ms is None else args.max_shift_ms,
        tuple(args.mouth_roi) if args.mouth_roi else None, args.model or DEFAULT_SPEECH_MODEL)
    _check_confidence(args, estimate.confidence)
    _store_av_offset(args.out, AvOffset(estimate.audio, estimate.video, estimate.offset_ns))
    return {"method": "sync", "audio": estimate.audio, "video": estimate.video,
            "offset_ms": estimate.offset_ns / 1e6, "confidence": estimate.confidence,
            "correlation": estimate.correlation, "video_windows": estimate.frames,
            "audio_windows": estimate.audio_windows, "mouth_roi": list(estimate.mouth_roi),
            "model": estimate.model, "written": args.out}


def _store_av_offset(out: str | None, offset: AvOffset) -> None:
    from fusion_node.calibration import Calibration, load_calibration, save_calibration

    if not out:
        return
    try:
        calibration = load_calibration(out)
    except CalibrationError:
        if os.path.exists(out):
            raise
        calibration = Calibration(out)
    calibration.av_offset = offset
    save_calibration(calibration)


def _clock(args: argparse.Namespace) -> dict[str, Any]:
    import zmq

    from fusion_node.clock import MonotonicClock
    from fusion_node.remote_clock import ClockError, ClockTracker

    clock = MonotonicClock()
    context = zmq.Context()
    tracker = ClockTracker(context, args.endpoint, clock)
    running = threading.Event()
    running.set()
    try:
        timer = threading.Timer(args.duration_s, running.clear)
        timer.start()
        tracker.run_blocking(running)
        timer.cancel()
    finally:
        tracker.close()
        context.term()
    mapping = tracker.mapping
    if mapping is None:
        raise ClockError(f"no reply from clock endpoint {args.endpoint!r} in "
                         f"{args.duration_s} s ({tracker.timeouts} requests timed out)")
    return {"endpoint": args.endpoint, **mapping.summary(clock.now_ns()),
            "timeouts": tracker.timeouts}
