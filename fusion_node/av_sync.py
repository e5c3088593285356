"""Audio-video offset from the speech model's audio-visual synchrony, as SyncNet does.

The speech engine (`engines/models/speech.onnx`, through ONNX Runtime, with the node's
preprocessing: `LogMel` and `mouth_crop`) is run twice over a log:

- video only, on windows ending every 10 ms, each on the 16 mouth crops the node would
  give it (the newest frame at or before each 40 ms slot): the voice activity the lips show;
- audio only, on windows slid over the audio in 5 ms steps: the voice activity heard.

Both outputs refer to the same 40 ms of audio ending at the window's end (the model's label
convention), so with correct stamps the two timelines line up. The offset is the shift of
the audio timeline that maximises their correlation, refined by a parabola through the peak
and its neighbours. Sign convention as the clap method's (`calibration.AvOffset`): audio
stamp minus video stamp of the same event, which the node subtracts from the audio stamps.
Confidence as SyncNet reports it: the peak correlation minus the median over all shifts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fusion_node.errors import CalibrationError

# Where the node finds the model named "speech" (fusion_node.node).
DEFAULT_SPEECH_MODEL = Path(str(resources.files("engines") / "models" / "speech.onnx"))
DEFAULT_MOUTH_ROI = (256, 272, 128, 96)  # fusion_node/default.toml's speech engine
AUDIO_STEP_NS = 5_000_000
VIDEO_STEP_NS = 10_000_000
_SAMPLE_RATE = 16_000  # the speech model's
_MEL_FRAMES = 64
_VIDEO_SLOTS = 16
_VIDEO_PERIOD_NS = 40_000_000  # the model sees mouth video at 25 fps
_MAX_FRAME_AGE_NS = 2 * _VIDEO_PERIOD_NS  # as the node's speech binding: older is missing
# How much older than its slot a frame was, on average, in the speech model's training windows
# (training.speech_corpus.Generator.training_windows: 70% of windows take each slot's frame
# uniformly up to a 30 fps frame period before it). The model reads a frame as showing the
# mouth this long before its slot; the node's frames are on average half a frame period old,
# so attributing the output to the window's end would bias the offset by the difference.
MODEL_FRAME_AGE_NS = round(0.7 * 1e9 / 30 / 2)
_MIN_FRAMES = 25  # fewer video windows than this cannot show a correlation peak


@dataclass
class SyncOffsetEstimate:
    audio: str
    video: str
    offset_ns: int  # audio stamp minus video stamp of the same event
    confidence: float  # SyncNet's: peak correlation minus the median over shifts
    correlation: float  # Pearson correlation of the two timelines at the offset
    frames: int  # video windows that took part
    audio_windows: int
    mouth_roi: tuple[int, int, int, int]
    model: str
    shifts_ms: list[float]  # the correlation curve, for plots and for judging the peak
    correlations: list[float]


@dataclass
class _Timeline:
    t_ns: np.ndarray  # int64: when the 40 ms each output is about ends
    activity: np.ndarray  # float64: the model's voice-activity logit for those 40 ms


class SyncScorer:
    """The speech engine run video-only and audio-only, as the node's speech binding feeds it."""

    def __init__(self, model: str | Path = DEFAULT_SPEECH_MODEL,
                 bias_ms: float | None = None) -> None:
        from engines.onnxruntime_backend import OnnxRuntimeEngine
        from engines.preprocess import LogMel

        self.model = str(model)
        if not Path(model).is_file():
            raise CalibrationError(f"speech model {self.model!r} not found")
        self.engine = OnnxRuntimeEngine(model, name="speech", intra_op_threads=1)
        inputs = {spec.name for spec in self.engine.inputs}
        outputs = {spec.name for spec in self.engine.outputs}
        if inputs != {"audio_mel", "audio_valid", "video", "video_valid"} \
                or "vad_logits" not in outputs:
            raise CalibrationError(f"model {self.model!r} is not a speech model (inputs "
                                   f"{sorted(inputs)}, outputs {sorted(outputs)})")
        # The model's own lip-to-voice delay (training/sync_bias.py), stored in the model file;
        # subtracted from every estimate.
        if bias_ms is None:
            try:
                bias_ms = float(self.engine.metadata.get("av_sync_bias_ms", 0.0))
            except ValueError:
                raise CalibrationError(f"model {self.model!r}: av_sync_bias_ms is not a "
                                       "number") from None
        self.bias_ns = round(bias_ms * 1e6)
        self.logmel = LogMel(sample_rate=_SAMPLE_RATE)
        self.window_samples = self.logmel.samples_for(_MEL_FRAMES)
        self._no_audio = (np.zeros((1, _MEL_FRAMES, self.logmel.n_mels), np.float32),
                          np.zeros((1, _MEL_FRAMES), np.float32))
        self._no_video = (np.zeros((1, _VIDEO_SLOTS, 48, 48), np.float32),
                          np.zeros((1, _VIDEO_SLOTS), np.float32))

    def _vad(self, mel: np.ndarray, mel_valid: np.ndarray, video: np.ndarray,
             video_valid: np.ndarray) -> float:
        out = self.engine.infer({"audio_mel": mel, "audio_valid": mel_valid,
                                 "video": video, "video_valid": video_valid})
        return float(out["vad_logits"][0, -1])

    def audio_timeline(self, signal: np.ndarray, valid: np.ndarray, t_first_ns: float,
                       step_ns: int = AUDIO_STEP_NS) -> _Timeline:
        """Audio-only voice activity of windows ending every `step_ns` (a multiple of half a
        mel hop). `signal` is mono 16 kHz; sample i was captured at t_first_ns + i / rate."""
        hop = self.logmel.hop_length
        step = step_ns * _SAMPLE_RATE // 1_000_000_000
        if step * 1_000_000_000 != step_ns * _SAMPLE_RATE or step % (hop // 2):
            raise CalibrationError(f"audio step {step_ns} ns is not a multiple of "
                                   f"{hop // 2} samples at {_SAMPLE_RATE} Hz")
        # A window's mel frames start on the hop grid or half a hop off it: two spectrograms
        # of the whole signal hold every window's frames (frames do not depend on the window).
        half = hop // 2
        mels = (self.logmel(signal), self.logmel(signal[half:]))
        valids = (self.logmel.frame_valid(valid), self.logmel.frame_valid(valid[half:]))
        ends = np.arange(self.window_samples, len(signal) + 1, step)
        activity = np.empty(len(ends))
        video, video_valid = self._no_video
        for k, end in enumerate(ends):
            start = int(end) - self.window_samples
            phase, first = (start % hop) // half, start // hop
            mel, mel_valid = mels[phase], valids[phase]
            activity[k] = self._vad(mel[None, first:first + _MEL_FRAMES],
                                    mel_valid[None, first:first + _MEL_FRAMES], video,
                                    video_valid)
        t_ns = np.round(t_first_ns + ends * (1e9 / _SAMPLE_RATE)).astype(np.int64)
        return _Timeline(t_ns, activity)

    def video_timeline(self, t_frames_ns: np.ndarray, crops: np.ndarray,
                       crop_valid: np.ndarray, step_ns: int = VIDEO_STEP_NS) -> _Timeline:
        """Video-only voice activity of windows ending every `step_ns` (frames in capture
        order). As in the node, a window's end is not tied to a frame: each slot takes the
        newest frame at or before it. Each output is placed at the time the model takes its
        newest frame to show."""
        span_ns = (_VIDEO_SLOTS - 1) * _VIDEO_PERIOD_NS
        offsets = np.arange(-(_VIDEO_SLOTS - 1), 1) * _VIDEO_PERIOD_NS
        audio, audio_valid = self._no_audio
        times, activity = [], []
        for t_end in range(int(t_frames_ns[0]) + span_ns, int(t_frames_ns[-1]) + 1, step_ns):
            slots = t_end + offsets
            index = np.searchsorted(t_frames_ns, slots, side="right") - 1
            ok = (t_frames_ns[index] >= slots - _MAX_FRAME_AGE_NS) & crop_valid[index]
            if not ok[-1]:
                continue  # no recent frame: the newest output would not be about the lips
            video = np.where(ok[:, None, None], crops[index], 0.0).astype(np.float32)
            activity.append(self._vad(audio, audio_valid, video[None],
                                      ok.astype(np.float32)[None]))
            # The model reads the newest frame as MODEL_FRAME_AGE_NS older than its slot.
            times.append(int(t_frames_ns[index[-1]]) + MODEL_FRAME_AGE_NS)
        return _Timeline(np.asarray(times, np.int64), np.asarray(activity))


def correlate(video: _Timeline, audio: _Timeline, max_shift_ns: int,
              step_ns: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of the video timeline with the audio timeline read `shift` later,
    for shifts -max_shift_ns..max_shift_ns; the same video frames for every shift."""
    shifts = np.arange(-max_shift_ns, max_shift_ns + 1, step_ns, dtype=np.int64)
    usable = ((video.t_ns - max_shift_ns >= audio.t_ns[0])
              & (video.t_ns + max_shift_ns <= audio.t_ns[-1]))
    if usable.sum() < _MIN_FRAMES:
        raise CalibrationError(f"only {int(usable.sum())} video windows overlap the audio "
                               f"within ±{max_shift_ns / 1e6:g} ms; need {_MIN_FRAMES}: record "
                               "a few seconds of speech with camera and microphone together")
    t_video = video.t_ns[usable]
    v = video.activity[usable] - video.activity[usable].mean()
    t_audio = (audio.t_ns - audio.t_ns[0]).astype(np.float64)
    scores = np.empty(len(shifts))
    for i, shift in enumerate(shifts):
        a = np.interp((t_video + shift - audio.t_ns[0]).astype(np.float64), t_audio,
                      audio.activity)
        a = a - a.mean()
        norm = np.sqrt((v * v).sum() * (a * a).sum())
        scores[i] = float((v * a).sum() / norm) if norm > 0 else 0.0
    return shifts, scores


def peak_offset_ns(shifts: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The shift of the correlation peak, refined by a parabola through it and its two
    neighbours; (shift ns, interpolated peak value)."""
    best = int(np.argmax(scores))
    if best == 0 or best == len(scores) - 1:
        return float(shifts[best]), float(scores[best])
    left, centre, right = scores[best - 1:best + 2]
    curvature = left - 2 * centre + right
    if curvature >= 0:  # flat top: no parabola to refine with
        return float(shifts[best]), float(centre)
    delta = 0.5 * (left - right) / curvature  # in steps, within ±0.5
    step = float(shifts[1] - shifts[0])
    return float(shifts[best]) + delta * step, float(centre - 0.25 * (left - right) * delta)


def recorded_mouth_roi(metadata: dict[str, dict[str, str]], video: str
                   ) -> tuple[int, int, int, int] | None:
    """The mouth ROI of the recording node's speech engine on `video`, if the log says."""
    from fusion_node.logs.mcap_format import RECORDING_METADATA

    config_text = metadata.get(RECORDING_METADATA, {}).get("config")
    if not config_text:
        return None
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError:
        return None
    for engine in config.get("engines", []) if isinstance(config, dict) else []:
        if not isinstance(engine, dict) or engine.get("binding") != "speech":
            continue
        if (engine.get("inputs") or {}).get("video") not in (None, video):
            continue
        roi = (engine.get("params") or {}).get("mouth_roi")
        if isinstance(roi, list) and len(roi) == 4 and all(isinstance(v, int) for v in roi):
            return (roi[0], roi[1], roi[2], roi[3])
    return None


def estimate_sync_offset(path: str, audio: str | None = None, video: str | None = None,
                         max_shift_ms: float = 200.0,
                         mouth_roi: tuple[int, int, int, int] | None = None,
                         model: str | Path = DEFAULT_SPEECH_MODEL,
                         scorer: SyncScorer | None = None) -> SyncOffsetEstimate:
    """The audio-video offset of a log in which the visible person speaks (see the module
    docstring). `mouth_roi` (x, y, w, h): default, the recording node's speech engine's
    fixed ROI for `video` if the log records it, else the default launch file's."""
    from engines.preprocess import mouth_crop
    from fusion_node.calibration import pick_stream
    from fusion_node.errors import EngineError
    from fusion_node.logs.mcap_format import LogReader
    from fusion_node.protocol import AudioChunk, Frame

    if not 0 < max_shift_ms <= 1000:
        raise CalibrationError(f"max shift {max_shift_ms} ms must be in (0, 1000]")
    scorer = scorer or SyncScorer(model)
    with LogReader(path) as reader:
        all_topics = reader.topics()
        audio = pick_stream(reader.topics(["audio"]), audio, "audio", path, all_topics)
        video = pick_stream(reader.topics(["frame"]), video, "video", path, all_topics)
        roi = mouth_roi or recorded_mouth_roi(reader.metadata(), video) or DEFAULT_MOUTH_ROI
        frame_ns: list[int] = []
        crops: list[np.ndarray] = []
        chunks: list[AudioChunk] = []
        for message in reader.messages([audio, video]):
            msg = message.decode(path)
            if isinstance(msg, Frame):
                try:  # cropped on the way: a log's full frames need not all fit in memory
                    crops.append(mouth_crop(msg.image, msg.encoding, roi))
                except EngineError as exc:
                    raise CalibrationError(f"log {path!r}, {video!r} frame {msg.seq}: "
                                           f"{exc}") from None
                frame_ns.append(msg.t_capture_ns)
            elif isinstance(msg, AudioChunk):
                chunks.append(msg)
    if len(frame_ns) < _MIN_FRAMES or not chunks:
        raise CalibrationError(f"log {path!r}: {len(frame_ns)} frames on {video!r} and "
                               f"{len(chunks)} audio chunks on {audio!r}; need at least "
                               f"{_MIN_FRAMES} frames and some audio")
    rates = {c.sample_rate for c in chunks}
    if rates != {_SAMPLE_RATE}:
        raise CalibrationError(f"log {path!r}: {audio!r} is sampled at {sorted(rates)} Hz; "
                               f"the speech model takes {_SAMPLE_RATE} Hz")
    signal, valid, t_first_ns = _audio_signal(chunks)
    if len(signal) < scorer.window_samples:
        raise CalibrationError(f"log {path!r}: {len(signal) / _SAMPLE_RATE:.2f} s of audio on "
                               f"{audio!r}; the speech model needs "
                               f"{scorer.window_samples / _SAMPLE_RATE:.3f} s per window")
    order = np.argsort(frame_ns, kind="stable")
    t_frames = np.asarray(frame_ns, np.int64)[order]
    crop_array = np.stack(crops)[order]
    video_line = scorer.video_timeline(t_frames, crop_array, np.ones(len(order), bool))
    audio_line = scorer.audio_timeline(signal, valid, t_first_ns)
    max_shift_ns = round(max_shift_ms * 1e6)
    shifts, scores = correlate(video_line, audio_line, max_shift_ns)
    best = int(np.argmax(scores))
    if best in (0, len(scores) - 1):
        raise CalibrationError(
            f"log {path!r}: lips and voice correlate best at the edge of the ±{max_shift_ms:g} "
            f"ms searched ({shifts[best] / 1e6:+g} ms, correlation {scores[best]:.3f}, median "
            f"{np.median(scores):.3f}): no synchrony peak. Widen --max-shift-ms, check "
            f"--mouth-roi {' '.join(map(str, roi))} frames the mouth, or use a trained speech "
            "model")
    offset_ns, peak = peak_offset_ns(shifts, scores)
    return SyncOffsetEstimate(
        audio, video, round(offset_ns) - scorer.bias_ns, round(peak - float(np.median(scores)), 4),
        round(peak, 4), len(video_line.t_ns), len(audio_line.t_ns),
        (int(roi[0]), int(roi[1]), int(roi[2]), int(roi[3])), scorer.model,
        [round(s / 1e6, 3) for s in shifts], [round(float(c), 4) for c in scores])


def _audio_signal(chunks: list[Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """Mono float32 samples on one timeline from sample_index (exact), with a per-sample
    valid mask (gaps are invalid), and the capture time of sample 0: the median over chunks
    of their stamp minus their position, so stamp jitter does not move the timeline."""
    first_index = min(c.sample_index for c in chunks)
    total = max(c.sample_index + len(c.samples) for c in chunks) - first_index
    signal = np.zeros(total, np.float32)
    valid = np.zeros(total, bool)
    anchors = np.empty(len(chunks))
    for k, chunk in enumerate(chunks):
        start = chunk.sample_index - first_index
        samples = np.asarray(chunk.samples, np.float32)
        mono = samples.mean(axis=1) if samples.ndim > 1 else samples
        signal[start:start + len(mono)] = mono
        valid[start:start + len(mono)] = True
        anchors[k] = chunk.t_capture_ns - start * (1e9 / _SAMPLE_RATE)
    return signal, valid, float(np.median(anchors))
