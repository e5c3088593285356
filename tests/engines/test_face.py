"""Face and lip landmarks on a real photograph (scikit-image's astronaut, Eileen Collins)."""

import asyncio
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.face import (
    DETECTOR_FILE,
    LANDMARK_FILE,
    FaceLandmarker,
    FaceRegion,
    MouthTracker,
    default_model_dir,
    onnx_name,
)
from engines.preprocess import mouth_crop
from fusion_node.alignment import AudioSpan, FrameStack, Window
from fusion_node.bindings import SPEECH_VIDEO_FRAMES, SpeechBinding
from fusion_node.config import load_config
from fusion_node.errors import ConfigError, EngineError
from fusion_node.node import make_binding
from fusion_node.protocol import AudioChunk, Frame

skimage_data = pytest.importorskip("skimage.data")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()  # 512x512 RGB uint8, one frontal face


@pytest.fixture(scope="module")
def landmarker() -> FaceLandmarker:
    return FaceLandmarker()


def camera_frame(astronaut: np.ndarray, dx: int = 64, dy: int = 0) -> np.ndarray:
    """The photograph placed in a 640x480 webcam-sized frame, shifted by (dx, dy)."""
    matrix = np.array([[1, 0, dx], [0, 1, dy]], np.float64)
    return cv2.warpAffine(astronaut, matrix, (640, 480))


def test_bundled_models_are_the_documented_files():
    readme = (default_model_dir() / "README.md").read_text()
    for name in ("face_detection_short_range.tflite", "face_landmark.tflite"):
        digest = hashlib.sha256((default_model_dir() / name).read_bytes()).hexdigest()
        assert digest in readme, name
    assert "Apache License" in (default_model_dir() / "LICENSE").read_text()


def test_shipped_onnx_models_are_what_the_converter_makes_of_the_tflite_files():
    face_onnx = pytest.importorskip("training.face_onnx")
    for name in (DETECTOR_FILE, LANDMARK_FILE):
        converted = face_onnx.convert(default_model_dir() / name).SerializeToString()
        shipped = (default_model_dir() / onnx_name(name)).read_bytes()
        assert converted == shipped, f"{onnx_name(name)}: python -m training.face_onnx " \
                                     "--out engines/models/face --force"


def test_converter_refuses_a_file_that_is_not_tflite():
    face_onnx = pytest.importorskip("training.face_onnx")
    with pytest.raises(face_onnx.ConversionError, match="not a TFLite flatbuffer"):
        face_onnx.convert(REPO / "engines" / "models" / "speech.onnx")


def test_converter_never_overwrites_without_force(tmp_path, capsys):
    face_onnx = pytest.importorskip("training.face_onnx")
    assert face_onnx.main(["--out", str(tmp_path)]) == 0
    before = (tmp_path / onnx_name(DETECTOR_FILE)).read_bytes()
    (tmp_path / onnx_name(DETECTOR_FILE)).write_bytes(b"mine")
    assert face_onnx.main(["--out", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / onnx_name(DETECTOR_FILE)).read_bytes() == b"mine"
    assert face_onnx.main(["--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / onnx_name(DETECTOR_FILE)).read_bytes() == before


def test_detector_finds_the_one_face(landmarker, astronaut):
    faces = landmarker.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    x, y, w, h = face.box
    assert face.score > 0.8
    # The face is in the upper middle of the photograph, roughly 1/5 of its width.
    assert 0.1 * 512 < w < 0.35 * 512 and 0.7 < h / w < 1.4
    assert 100 < x + w / 2 < 350 and 50 < y + h / 2 < 220
    right_eye, left_eye, nose, mouth = face.keypoints[:4]
    assert right_eye[0] < nose[0] < left_eye[0]  # unmirrored photo: subject's right is left
    assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1]


def test_lip_landmarks_lie_on_the_mouth(landmarker, astronaut):
    face = landmarker(astronaut)
    assert face is not None and face.presence > 0.9
    assert face.points.shape == (468, 3) and face.points.dtype == np.float32
    x, y, w, h = landmarker.detect(astronaut)[0].box
    upper, lower, right, left = face.mouth()
    centre = (upper + lower + right + left) / 4
    assert x < centre[0] < x + w and y + 2 * h / 3 < centre[1] < y + h  # lower third of face
    assert right[0] < centre[0] < left[0]
    assert upper[1] < lower[1]
    assert 0.25 < (left[0] - right[0]) / w < 0.6
    # The lips sit below the nose tip and the eyes.
    assert face.points[1, 1] < upper[1]  # 1: nose tip
    assert face.points[[33, 263], 1].max() < upper[1]


def test_bgr_input_gives_the_same_landmarks(landmarker, astronaut):
    rgb = landmarker(astronaut)
    bgr = landmarker(np.ascontiguousarray(astronaut[:, :, ::-1]), "bgr8")
    assert rgb is not None and bgr is not None
    np.testing.assert_allclose(bgr.points[:, :2], rgb.points[:, :2], atol=0.5)


def test_tracking_from_landmarks_agrees_with_the_detector(landmarker, astronaut):
    detected = landmarker(astronaut)
    assert detected is not None
    tracked = landmarker.landmarks(astronaut, landmarker.region_from_landmarks(detected))
    assert tracked is not None
    lips = [13, 14, 78, 308]
    assert np.abs(tracked.points[lips, :2] - detected.points[lips, :2]).max() < 3.0


def test_a_region_off_the_face_is_rejected_by_the_presence_score(landmarker, astronaut):
    # The bottom right corner holds the helmet: no face there.
    assert landmarker.landmarks(astronaut, FaceRegion(440, 440, 120, 0.0)) is None


def test_rotated_face_is_still_found(landmarker, astronaut):
    # Rolling the head by 20 degrees: the crop follows the eye line, the lips stay ordered
    # along the face's own axes.
    matrix = cv2.getRotationMatrix2D((256, 256), -20, 1.0)  # clockwise on screen
    rotated = cv2.warpAffine(astronaut, matrix, (512, 512))
    face = landmarker(rotated)
    assert face is not None
    assert 0.2 < face.region.rotation < 0.6  # radians, about 0.17 + 0.35
    upper, lower, right, left = face.mouth()
    expected = cv2.transform(landmarker(astronaut).points[None, [13, 14, 78, 308], :2]
                             .astype(np.float64), matrix)[0]
    assert np.abs(np.stack([upper, lower, right, left]) - expected).max() < 4.0


def test_blank_and_noise_frames_have_no_face(landmarker):
    blank = np.zeros((480, 640, 3), np.uint8)
    assert landmarker.detect(blank) == []
    assert landmarker(blank) is None
    assert MouthTracker(landmarker)(blank) is None
    grey = np.full((480, 640, 3), 128, np.uint8)
    assert MouthTracker(landmarker)(grey) is None


@pytest.mark.parametrize("image, encoding, message", [
    (np.zeros((480, 640, 3), np.float32), "rgb8", "uint8"),
    (np.zeros((480, 640), np.uint8), "rgb8", "HxWx3"),
    (np.zeros((480, 640, 4), np.uint8), "rgb8", "HxWx3"),
    (np.zeros((8, 8, 3), np.uint8), "rgb8", "too small"),
    (np.zeros((480, 640, 3), np.uint8), "yuv420", "encoding"),
    ([[0, 0, 0]], "rgb8", "list"),
])
def test_bad_images_raise_a_clear_error(landmarker, image, encoding, message):
    with pytest.raises(EngineError, match=message):
        landmarker.detect(image, encoding)  # type: ignore[arg-type]
    with pytest.raises(EngineError, match=message):
        MouthTracker(landmarker)(image, encoding)  # type: ignore[arg-type]


def test_bad_settings_raise(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        FaceLandmarker(tmp_path)
    with pytest.raises(EngineError, match="thresholds"):
        FaceLandmarker(min_detection_score=1.5)
    with pytest.raises(EngineError, match="smoothing"):
        MouthTracker(smoothing=1.0)


def test_mouth_region_is_a_square_around_the_lips(landmarker, astronaut):
    roi = MouthTracker(landmarker, margin=0.4)(astronaut)
    assert roi is not None
    x, y, w, h = roi
    face = landmarker(astronaut)
    assert face is not None
    lips = np.stack(face.mouth())
    assert w == h
    assert (lips[:, 0] > x).all() and (lips[:, 0] < x + w).all()
    assert (lips[:, 1] > y).all() and (lips[:, 1] < y + h).all()
    mouth_width = np.linalg.norm(lips[3] - lips[2])
    assert w == pytest.approx(1.8 * mouth_width, rel=1e-4)


def test_mouth_region_is_smoothed_and_follows_the_face(landmarker, astronaut):
    tracker = MouthTracker(landmarker, smoothing=0.5)
    start = tracker(camera_frame(astronaut, dx=64))
    assert start is not None
    # A small move (6 px) is smoothed: half of it after one frame, nearly all after eight.
    first = tracker(camera_frame(astronaut, dx=70))
    assert first is not None
    assert first[0] - start[0] == pytest.approx(3.0, abs=1.0)
    for _ in range(7):
        settled = tracker(camera_frame(astronaut, dx=70))
    assert settled is not None and settled[0] - start[0] == pytest.approx(6.0, abs=1.0)
    # A large move (a cut) is followed at once, not glided across.
    jumped = tracker(camera_frame(astronaut, dx=-60, dy=-30))
    assert jumped is not None
    assert jumped[0] - settled[0] == pytest.approx(-130, abs=3)
    assert jumped[1] - settled[1] == pytest.approx(-30, abs=3)
    # Losing the face gives None, and the face is found again afterwards.
    assert tracker(np.zeros((480, 640, 3), np.uint8)) is None
    again = tracker(camera_frame(astronaut, dx=64))
    assert again is not None and np.allclose(again, start, atol=1.0)


def speech_window(frames: list[Frame | None]) -> Window:
    samples = 10_480
    chunk = AudioChunk("audio.mic0", 0, 0, 16_000, 0, np.zeros((samples, 1), np.float32))
    span = AudioSpan(np.zeros((samples, 1), np.float32), np.ones(samples, bool), 16_000, 0,
                     chunk)
    stack = FrameStack(frames, np.array([f is not None for f in frames]))
    return Window(t_ref_ns=0, data={"audio.mic0": span, "camera.front": stack})


def test_speech_binding_tracks_the_mouth_and_masks_faceless_frames(astronaut):
    binding = SpeechBinding("audio.mic0", "camera.front", "landmarks")
    face = camera_frame(astronaut)
    blank = np.zeros_like(face)
    images = [face] * 6 + [blank] * 4 + [face] * 4 + [None] * 2
    assert len(images) == SPEECH_VIDEO_FRAMES
    frames = [None if image is None else Frame("camera.front", seq, seq * 40_000_000, image)
              for seq, image in enumerate(images)]
    feeds = binding.feeds(speech_window(frames))
    expected = [1.0] * 6 + [0.0] * 4 + [1.0] * 4 + [0.0] * 2
    assert feeds["video_valid"][0].tolist() == expected
    video = feeds["video"][0]
    assert video.shape == (SPEECH_VIDEO_FRAMES, 48, 48)
    # Valid slots hold the lips: the same region cropped by hand, textured (teeth, lips).
    roi = MouthTracker()(face)
    assert roi is not None
    np.testing.assert_allclose(video[0], mouth_crop(face, "rgb8", roi), atol=1e-6)
    assert all(video[i].std() > 0.05 for i in range(16) if expected[i])
    assert not video[[i for i in range(16) if not expected[i]]].any()
    # The next window shares 15 frames: they come from the cache, so the result is the same.
    again = binding.feeds(speech_window(frames))
    np.testing.assert_array_equal(again["video"], feeds["video"])
    np.testing.assert_array_equal(again["video_valid"], feeds["video_valid"])


def test_speech_binding_rejects_an_unknown_roi_mode():
    with pytest.raises(ConfigError, match="mouth_roi"):
        SpeechBinding("audio.mic0", "camera.front", "lips")


def test_webcam_launch_file_uses_landmarks():
    config = load_config(REPO / "launch" / "webcam.toml")
    speech = next(e for e in config.engines if e.binding == "speech")
    assert speech.params["mouth_roi"] == "landmarks"
    binding = make_binding(speech, config)
    assert isinstance(binding, SpeechBinding)


async def test_webcam_launch_file_with_a_video_file_finds_the_mouth(astronaut, tmp_path):
    """launch/webcam.toml as shipped, with a video file for the webcam and a WAV file for
    the microphone: the node's speech engine finds the mouth through the landmarker."""
    import dataclasses
    import wave

    from tests.conftest import running

    video = tmp_path / "face.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    for k in range(60):  # the face drifts a little, as a person in front of a laptop does
        writer.write(cv2.cvtColor(camera_frame(astronaut, 64 + k % 10, k % 6),
                                  cv2.COLOR_RGB2BGR))
    writer.release()
    audio = tmp_path / "room.wav"
    with wave.open(str(audio), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        noise = np.random.default_rng(0).normal(0, 300, 16_000 * 2).astype(np.int16)
        out.writeframes(noise.tobytes())
    config = load_config(REPO / "launch" / "webcam.toml")
    sources = {"camera": {"source": str(video), "loop": True},
               "microphone": {"path": str(audio), "loop": True}}
    drivers = []
    for driver in config.drivers:
        if driver.kind == "microphone":
            driver = dataclasses.replace(driver, kind="wav", config=sources["microphone"])
        elif driver.kind == "camera":
            driver = dataclasses.replace(driver, config=sources["camera"])
        elif driver.kind == "sim_arm":  # no node on the default port to follow
            driver = dataclasses.replace(
                driver, config={**driver.config, "actions": f"ipc://{tmp_path}/actions"})
        drivers.append(driver)
    config = dataclasses.replace(config, drivers=tuple(drivers))
    async with running(config) as (node, collector):
        await asyncio.sleep(3.0)
        health = node.health()
    mouth = health["engines"]["speech"]["mouth_landmarks"]
    assert mouth["found"] >= 30 and mouth["missed"] <= 0.05 * mouth["found"], mouth
    speech = collector.on("pred.speech")
    assert len(speech) > 30 and all(p.mask["camera.front"] for p in speech[5:])
