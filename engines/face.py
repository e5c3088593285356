"""Face and lip landmarks from camera frames, for the live mouth region.

Two MediaPipe 0.10.21 models (Apache-2.0, see engines/models/face/README.md), converted
from TFLite to ONNX by `training/face_onnx.py` and run on the engine backends (ONNX Runtime
on the CPU; TensorRT can take them over on a GPU), so the node needs neither mediapipe nor a
TFLite runtime, and no OpenCV DNN engine flag that a release can take away:

- `face_detection_short_range.tflite` (BlazeFace, 128x128, faces within about 2 m): 896
  anchor-relative boxes with 6 keypoints each, decoded and merged as MediaPipe's face
  detection graph does (SSD anchors, sigmoid scores, weighted non-maximum suppression).
- `face_landmark.tflite` (192x192 face crop, rotated so the eyes are level): 468 face-mesh
  landmarks and a face-presence score.

`FaceLandmarker` runs one frame; `MouthTracker` follows a face across frames (landmarks of
the previous frame give the next crop, the detector runs only when the face is lost) and
returns a square mouth region for `preprocess.mouth_crop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from engines.backends import create_engine
from fusion_node.errors import EngineError

ENCODINGS = ("rgb8", "bgr8")
DETECTOR_FILE = "face_detection_short_range.tflite"
LANDMARK_FILE = "face_landmark.tflite"
DETECTOR_SIZE = 128
LANDMARK_SIZE = 192
LANDMARK_COUNT = 468
# Face-mesh indices: lip midpoints (upper lip's inner edge, lower lip's inner edge), mouth
# corners (subject's right, left), and the outer eye corners that set the crop's rotation.
UPPER_LIP, LOWER_LIP, MOUTH_RIGHT, MOUTH_LEFT = 13, 14, 78, 308
EYE_RIGHT_OUTER, EYE_LEFT_OUTER = 33, 263
# Detector keypoints: 0 subject's right eye, 1 left eye, 2 nose tip, 3 mouth, 4-5 ears.
KEYPOINT_RIGHT_EYE, KEYPOINT_LEFT_EYE = 0, 1


def default_model_dir() -> Path:
    """The folder holding the two bundled models (.tflite sources and their .onnx)."""
    return Path(str(resources.files("engines") / "models" / "face"))


def onnx_name(tflite_name: str) -> str:
    """The ONNX file converted from one of the .tflite files."""
    return str(Path(tflite_name).with_suffix(".onnx"))


@dataclass(frozen=True)
class FaceDetection:
    """One detected face in image pixels: box (x, y, w, h), keypoints [6, 2], score in (0, 1)."""

    box: tuple[float, float, float, float]
    keypoints: np.ndarray
    score: float


@dataclass(frozen=True)
class FaceRegion:
    """A square, rotated face crop in image pixels: centre, side, rotation (radians,
    clockwise on screen, i.e. the crop's x axis points along (cos, sin) in the image)."""

    centre_x: float
    centre_y: float
    side: float
    rotation: float

    def crop_to_image(self, crop_size: int) -> np.ndarray:
        """2x3 affine matrix taking crop pixels [0, crop_size) to image pixels."""
        scale = self.side / crop_size
        cos, sin = math.cos(self.rotation) * scale, math.sin(self.rotation) * scale
        half = crop_size / 2
        return np.array([[cos, -sin, self.centre_x - half * (cos - sin)],
                         [sin, cos, self.centre_y - half * (sin + cos)]], np.float64)


@dataclass(frozen=True)
class FaceLandmarks:
    """468 face-mesh landmarks [468, 3] in image pixels (z: depth, same scale as x, smaller
    is nearer the camera), the face-presence score in (0, 1) and the crop they came from."""

    points: np.ndarray
    presence: float
    region: FaceRegion

    def mouth(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(upper lip, lower lip, subject's right corner, left corner), each [x, y] pixels."""
        xy = self.points[:, :2]
        return xy[UPPER_LIP], xy[LOWER_LIP], xy[MOUTH_RIGHT], xy[MOUTH_LEFT]


def _anchors() -> np.ndarray:
    """BlazeFace short-range SSD anchor centres [896, 2] in [0, 1].

    MediaPipe's SsdAnchorsCalculator with num_layers 4, strides [8, 16, 16, 16], one aspect
    ratio plus the interpolated scale, fixed anchor size: two anchors per cell on the 16x16
    map (stride 8) and 3 x 2 = 6 per cell on the 8x8 map (the three stride-16 layers are
    merged because they share a grid). Anchor sizes are fixed at 1, so only centres matter.
    """
    centres = []
    for grid, per_cell in ((DETECTOR_SIZE // 8, 2), (DETECTOR_SIZE // 16, 6)):
        ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        cells = np.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], axis=-1).reshape(-1, 2)
        centres.append(np.repeat(cells, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x0, y0, x1, y1) box with each row of `boxes`."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def _weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                  iou_threshold: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's WEIGHTED suppression: each kept face is the score-weighted mean of the
    boxes that overlap the best remaining one, which steadies the box between frames."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    remaining = np.arange(len(scores))
    kept = []
    while remaining.size:
        overlap = _iou(boxes[remaining[0]], boxes[remaining]) > iou_threshold
        group = remaining[overlap]
        weights = scores[group][:, None]
        box = (boxes[group] * weights).sum(0) / weights.sum()
        points = (keypoints[group] * weights[:, :, None]).sum(0) / weights.sum()
        kept.append((box, points, float(scores[group[0]])))
        remaining = remaining[~overlap]
    return kept


def check_image(image: np.ndarray, encoding: str) -> None:
    """EngineError unless `image` is an HxWx3 uint8 frame in a supported encoding."""
    if encoding not in ENCODINGS:
        raise EngineError(f"face landmarker: image encoding {encoding!r} not supported; "
                          f"expected one of {ENCODINGS}")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 \
            or image.dtype != np.uint8:
        got = (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise EngineError(f"face landmarker: expected an HxWx3 uint8 image, got {got}")
    if image.shape[0] < 16 or image.shape[1] < 16:
        raise EngineError(f"face landmarker: image {image.shape[1]}x{image.shape[0]} is too "
                          "small to hold a face")


class FaceLandmarker:
    """Face detector + 468-point face-mesh landmark model on one frame.

    `backend` picks the engine backend as for any engine ("auto": TensorRT where usable,
    else ONNX Runtime).
    Not thread-safe: one instance per engine worker thread.
    """

    def __init__(self, model_dir: Path | str | None = None, min_detection_score: float = 0.5,
                 min_presence: float = 0.5, nms_iou: float = 0.3,
                 crop_scale: float = 1.5, backend: str = "auto") -> None:
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        paths = [model_dir / onnx_name(name) for name in (DETECTOR_FILE, LANDMARK_FILE)]
        for path in paths:
            if not path.is_file():
                raise EngineError(f"face landmarker: model file {path} not found (made by "
                                  "`python -m training.face_onnx`)")
        if not 0 < min_detection_score < 1 or not 0 < min_presence < 1:
            raise EngineError(f"face landmarker: thresholds must lie in (0, 1), got "
                              f"min_detection_score={min_detection_score} "
                              f"min_presence={min_presence}")
        # fp32: the landmark model's sub-pixel regression is what the mouth crop rests on.
        self._detector = create_engine(paths[0], backend=backend, name="face_detector",
                                       precision="fp32")
        self._landmarker = create_engine(paths[1], backend=backend, name="face_landmarks",
                                         precision="fp32")
        self.backend: str = self._detector.backend
        self._anchors = _anchors()
        self.min_detection_score = min_detection_score
        self.min_presence = min_presence
        self.nms_iou = nms_iou
        self.crop_scale = crop_scale

    def detect(self, image: np.ndarray, encoding: str = "rgb8") -> list[FaceDetection]:
        """Faces in the frame, best first (empty if none scores above min_detection_score)."""
        check_image(image, encoding)
        height, width = image.shape[:2]
        # Letterbox: keep the aspect ratio, pad the short side, as MediaPipe's graph does.
        scale = DETECTOR_SIZE / max(height, width)
        new_w = max(1, round(width * scale))
        new_h = max(1, round(height * scale))
        pad_x, pad_y = (DETECTOR_SIZE - new_w) // 2, (DETECTOR_SIZE - new_h) // 2
        small = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        if encoding == "bgr8":
            small = cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
        canvas = np.zeros((DETECTOR_SIZE, DETECTOR_SIZE, 3), np.float32)
        # The detector was trained on [-1, 1] inputs; padding is black (-1).
        canvas[...] = -1.0
        canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = small * np.float32(2 / 255) - 1
        outputs = self._detector.infer({"input": canvas.transpose(2, 0, 1)[None].copy()})
        regressors, scores = outputs["regressors"], outputs["classificators"]
        # MediaPipe's score clipping; float64 so exp(100) does not overflow.
        logits = np.clip(scores.reshape(-1).astype(np.float64), -100, 100)
        probability = 1 / (1 + np.exp(-logits))
        hits = np.flatnonzero(probability >= self.min_detection_score)
        if hits.size == 0:
            return []
        raw = regressors.reshape(-1, 16)[hits] / DETECTOR_SIZE
        anchors = self._anchors[hits]
        centre = raw[:, 0:2] + anchors
        half = raw[:, 2:4] / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        keypoints = raw[:, 4:16].reshape(-1, 6, 2) + anchors[:, None, :]
        faces = []
        pad = np.array([pad_x, pad_y], np.float32)
        for box, points, score in _weighted_nms(boxes, keypoints, probability[hits],
                                                 self.nms_iou):
            # Letterbox [0, 1] coordinates -> image pixels.
            (x0, y0), (x1, y1) = (box.reshape(2, 2) * DETECTOR_SIZE - pad) / scale
            pixels = (points * DETECTOR_SIZE - pad) / scale
            faces.append(FaceDetection((float(x0), float(y0), float(x1 - x0), float(y1 - y0)),
                                       pixels.astype(np.float32), score))
        return faces

    def region_from_detection(self, face: FaceDetection) -> FaceRegion:
        """The landmark model's crop for a detection: square, 1.5x the box, eyes level."""
        x, y, w, h = face.box
        eye_r, eye_l = face.keypoints[KEYPOINT_RIGHT_EYE], face.keypoints[KEYPOINT_LEFT_EYE]
        rotation = math.atan2(float(eye_l[1] - eye_r[1]), float(eye_l[0] - eye_r[0]))
        return FaceRegion(x + w / 2, y + h / 2, max(w, h) * self.crop_scale, rotation)

    def region_from_landmarks(self, face: FaceLandmarks) -> FaceRegion:
        """The next frame's crop from this frame's landmarks (MediaPipe's tracking step):
        square, 1.5x the landmarks' extent, measured along the eye-levelled axes (MediaPipe
        measures it upright, which loosens the crop around a tilted head)."""
        xy = face.points[:, :2].astype(np.float64)
        eye_r, eye_l = xy[EYE_RIGHT_OUTER], xy[EYE_LEFT_OUTER]
        rotation = math.atan2(eye_l[1] - eye_r[1], eye_l[0] - eye_r[0])
        cos, sin = math.cos(rotation), math.sin(rotation)
        # Coordinates along the crop's own axes, so the box is measured upright.
        u = xy[:, 0] * cos + xy[:, 1] * sin
        v = -xy[:, 0] * sin + xy[:, 1] * cos
        cu, cv_ = (u.min() + u.max()) / 2, (v.min() + v.max()) / 2
        side = max(u.max() - u.min(), v.max() - v.min()) * self.crop_scale
        return FaceRegion(cu * cos - cv_ * sin, cu * sin + cv_ * cos, side, rotation)

    def landmarks(self, image: np.ndarray, region: FaceRegion,
                  encoding: str = "rgb8") -> FaceLandmarks | None:
        """Landmarks of the face in `region`, or None if the presence score is too low."""
        check_image(image, encoding)
        if not region.side > 0:
            raise EngineError(f"face landmarker: face region {region} has no area")
        matrix = region.crop_to_image(LANDMARK_SIZE)
        crop = cv2.warpAffine(image, matrix, (LANDMARK_SIZE, LANDMARK_SIZE),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
        if encoding == "bgr8":
            crop = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
        blob = crop.transpose(2, 0, 1)[None].astype(np.float32) * np.float32(1 / 255)
        outputs = self._landmarker.infer({"input_1": blob})
        presence_logit, raw = outputs["conv2d_31"], outputs["conv2d_21"]
        presence = float(1 / (1 + math.exp(-float(np.clip(presence_logit.item(), -100, 100)))))
        if presence < self.min_presence:
            return None
        crop_points = raw.reshape(LANDMARK_COUNT, 3).astype(np.float64)
        points = np.empty((LANDMARK_COUNT, 3), np.float32)
        points[:, :2] = crop_points[:, :2] @ matrix[:, :2].T + matrix[:, 2]
        points[:, 2] = crop_points[:, 2] * (region.side / LANDMARK_SIZE)
        return FaceLandmarks(points, presence, region)

    def __call__(self, image: np.ndarray, encoding: str = "rgb8") -> FaceLandmarks | None:
        """Landmarks of the most confidently detected face, or None if there is none."""
        faces = self.detect(image, encoding)
        if not faces:
            return None
        return self.landmarks(image, self.region_from_detection(faces[0]), encoding)


class MouthTracker:
    """Square mouth region (x, y, w, h) in pixels per frame, or None when no face is seen.

    Call once per frame in capture order. The previous frame's landmarks give this frame's
    face crop (the detector runs only when the face was lost), and the region's centre and
    side are smoothed exponentially; a jump larger than half the side (a different face, a
    cut) resets the smoothing instead of gliding across the frame.
    """

    def __init__(self, landmarker: FaceLandmarker | None = None, margin: float = 0.4,
                 smoothing: float = 0.5) -> None:
        if margin < 0 or not 0 <= smoothing < 1:
            raise EngineError(f"mouth tracker: need margin >= 0 and 0 <= smoothing < 1, got "
                              f"margin={margin} smoothing={smoothing}")
        self.landmarker = landmarker if landmarker is not None else FaceLandmarker()
        self.margin = margin
        self.smoothing = smoothing
        self._previous: FaceLandmarks | None = None
        self._state: np.ndarray | None = None  # smoothed (centre x, centre y, side)

    def reset(self) -> None:
        """Forget the tracked face (e.g. after a gap in the video)."""
        self._previous = None
        self._state = None

    def __call__(self, image: np.ndarray,
                 encoding: str = "rgb8") -> tuple[float, float, float, float] | None:
        face = None
        if self._previous is not None:
            region = self.landmarker.region_from_landmarks(self._previous)
            face = self.landmarker.landmarks(image, region, encoding)
        if face is None:
            face = self.landmarker(image, encoding)
        self._previous = face
        if face is None:
            self._state = None
            return None
        upper, lower, right, left = face.mouth()
        centre = (upper + lower + right + left) / 4
        # Mouth width sets the scale: it barely changes as the mouth opens, so the region
        # does not breathe with speech.
        side = float(np.linalg.norm(left - right)) * (1 + 2 * self.margin)
        measured = np.array([centre[0], centre[1], side], np.float64)
        if self._state is None or np.linalg.norm(measured[:2] - self._state[:2]) \
                > self._state[2] / 2:
            self._state = measured
        else:
            self._state = self.smoothing * self._state + (1 - self.smoothing) * measured
        x, y, s = self._state
        return (float(x - s / 2), float(y - s / 2), float(s), float(s))
