"""Real face photographs that talk: a viseme track moves the mouth of a still photograph.

The speech model is trained on a drawn mouth (`drivers.sim.mouth`); a real camera shows a real
one. This module takes the real faces that installed packages ship, opens and shapes their
mouths from an (opening, width) track (`drivers.sim.mouth.mouth_track`), adds head motion, and
runs the frames through the node's own mouth path (`engines.face.MouthTracker`, then
`engines.preprocess.mouth_crop`, slot timing as `fusion_node.bindings.SpeechBinding`), so the
model can be evaluated on real faces seen the way the node sees them.

Photographs (read where their package installs them; nothing is copied into this repository):

| name         | file, inside its package                         | licence          | used      |
|--------------|--------------------------------------------------|------------------|-----------|
| astronaut    | skimage/data/astronaut.png (Eileen Collins)      | public domain, 1 | yes       |
| grace_hopper | matplotlib/mpl-data/sample_data/grace_hopper.jpg | public domain, 2 | yes       |
| camera       | skimage/data/camera.png (a cameraman)            | CC0, 1           | no, 3     |
| lfw_subset   | skimage/data/lfw_subset.npy (100 faces, 25x25)   | none stated, 4   | no, 4     |

1. scikit-image's `skimage.data` docstrings: astronaut, a NASA portrait, "no known copyright
   restrictions"; camera, CC0 by the photographer, Lav Varshney.
2. A US Navy portrait; matplotlib added it as a public-domain image (matplotlib PR #1599).
3. In profile: the landmarker finds the face, but its lip landmarks land off the lips.
4. Labeled Faces in the Wild: news photographs, no licence stated; 25x25 pixels (the mouth
   ~8 px), found by the landmarker only once upscaled.

Also looked at and not faces: skimage's other images and `no_time_for_that_tiny.gif` (25x14
px), sklearn's china/flower, klettres's cartoon bear. A photograph is used when the
landmarker finds exactly one face, seen from the front (the nose tip lies near the middle of
the eyes) with a mouth at least `MIN_MOUTH_PX` wide.

The warp (`TalkingPhoto.frame`) is a smooth displacement field in a frame aligned with the
mouth, torn only along the lips' slit: the upper lip rises by `UPPER_SHARE` of the gap change,
the lower lip and the jaw down to the chin drop by the rest, the corners move in or out with
`width`, and everything fades to zero inside a box that stops below the eyes, so the rest of
the face stays put. Where the lips part, the inside of the mouth is painted: dark, with the
upper teeth (and the lower ones when wide open). A photograph's own open mouth (the astronaut
smiles with her teeth showing) is closed by the same field: its interior is never sampled.

`python -m training.real_faces` reports, per photograph, how well the landmarker's lip gap on
the warped frames follows the commanded opening, and the warp's cost per frame.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from drivers.sim.espeak import Phoneme
from drivers.sim.mouth import REST, mouth_track
from engines.face import FaceLandmarker, FaceLandmarks, MouthTracker
from engines.preprocess import mouth_crop
from fusion_node.alignment import AlignmentBuffer
from fusion_node.bindings import (
    SPEECH_SAMPLE_RATE,
    SPEECH_VIDEO_FRAMES,
    SPEECH_VIDEO_PERIOD_NS,
    SpeechBinding,
)
from fusion_node.errors import EngineError
from fusion_node.protocol import AudioChunk, Frame

# Face-mesh lip contours (MediaPipe's FACEMESH_LIPS), each from the subject's right corner
# (image left on a frontal face) to the left corner.
OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
OUTER_LIP = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39,
             40, 185)
INNER_LIP = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81,
             80, 191)
NOSE_TIP, CHIN, EYE_RIGHT, EYE_LEFT = 1, 152, 33, 263
INNER_RIGHT, INNER_LEFT, OUTER_RIGHT, OUTER_LEFT = 78, 308, 61, 291

MAX_GAP = 0.35
"""Inner-lip gap at opening 1, as a fraction of the mouth width: about 17 mm for a 50 mm mouth,
a wide "ah" in speech (0.9 gives 0.32)."""
UPPER_SHARE = 0.2
"""Share of a gap change taken by the upper lip; the jaw and lower lip take the rest."""
MIN_MOUTH_PX = 24.0

CHECK_TEXTS = ("please go left", "red", "go home now", "stop", "the blue one is mine")
"""What `check` says: commands and a sentence, with open, rounded and spread vowels."""

TrackFn = Callable[[np.ndarray], np.ndarray]
"""Mouth shape at times: float [T] seconds -> [T, 2] (opening, width)."""


# Photographs ---------------------------------------------------------------------------------

def _candidates() -> dict[str, np.ndarray]:
    """Every real face photograph an installed package ships, RGB uint8 (may be empty)."""
    found: dict[str, np.ndarray] = {}
    try:
        from skimage import data as skimage_data
    except ImportError:
        skimage_data = None
    if skimage_data is not None:
        found["astronaut"] = skimage_data.astronaut()
        found["camera"] = np.repeat(skimage_data.camera()[:, :, None], 3, axis=2)
    try:
        from matplotlib import cbook
    except ImportError:
        cbook = None
    if cbook is not None:
        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is not None:
            found["grace_hopper"] = np.ascontiguousarray(bgr[:, :, ::-1])
    return found


def usable(landmarker: FaceLandmarker, image: np.ndarray) -> str | None:
    """Why a photograph cannot be animated, or None if it can: exactly one face, frontal (the
    nose tip within the middle 40% between the outer eye corners), a wide enough mouth."""
    faces = landmarker.detect(image)
    if len(faces) != 1:
        return f"{len(faces)} faces detected"
    face = landmarker.landmarks(image, landmarker.region_from_detection(faces[0]))
    if face is None:
        return "the landmark model sees no face"
    xy = face.points[:, :2].astype(np.float64)
    eyes = xy[EYE_LEFT] - xy[EYE_RIGHT]
    across = float(np.dot(xy[NOSE_TIP] - xy[EYE_RIGHT], eyes) / np.dot(eyes, eyes))
    if not 0.3 < across < 0.7:
        return f"not frontal (nose tip at {across:.2f} of the eye span)"
    width = float(np.linalg.norm(xy[OUTER_LEFT] - xy[OUTER_RIGHT]))
    if width < MIN_MOUTH_PX:
        return f"mouth only {width:.0f} px wide"
    return None


@functools.lru_cache(maxsize=1)
def _photographs() -> tuple[tuple[str, np.ndarray], ...]:
    landmarker = _landmarker()
    kept = []
    for name, image in _candidates().items():
        if usable(landmarker, image) is None:
            image.setflags(write=False)
            kept.append((name, image))
    return tuple(kept)


def photographs() -> dict[str, np.ndarray]:
    """The usable real faces, name -> RGB uint8 (read-only), in a fixed order."""
    return dict(_photographs())


@functools.lru_cache(maxsize=1)
def _landmarker() -> FaceLandmarker:
    # One shared instance for this module's own checks (the models load in ~0.1 s).
    return FaceLandmarker()


@functools.lru_cache(maxsize=8)
def talking_photo(name: str) -> TalkingPhoto:
    """The TalkingPhoto of a photograph from `photographs()`, made once."""
    images = photographs()
    if name not in images:
        raise KeyError(f"no usable photograph {name!r}; have {sorted(images)}")
    return TalkingPhoto(images[name], _landmarker())


# The talking photograph ---------------------------------------------------------------------

def width_scale(width: float) -> float:
    """Mouth width relative to rest for a track's `width`, as the drawn mouth scales it
    (`render_mouth`: half-width x (0.7 + 0.5 width)): 0.85 rounded, 1.18 spread."""
    return (0.7 + 0.5 * width) / (0.7 + 0.5 * REST[1])


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _falloff(z: np.ndarray, sigma: float) -> np.ndarray:
    """1 up to z = 0, then a Gaussian decay with `sigma`."""
    z = np.maximum(z, 0.0)
    return np.exp(-(z * z) / np.float32(2 * sigma * sigma))


class TalkingPhoto:
    """A photograph whose mouth takes any (opening, width) shape; see the module docstring.

    Geometry lives in a mouth frame: origin midway between the inner lip corners, x towards the
    subject's left corner (image right), y down, pixels. The field is computed on a grid a few
    pixels coarse (it is smooth on each side of the slit) and resized to the mouth box.
    """

    def __init__(self, image: np.ndarray, landmarker: FaceLandmarker | None = None) -> None:
        landmarker = landmarker if landmarker is not None else _landmarker()
        faces = landmarker.detect(image)
        if len(faces) != 1:
            raise ValueError(f"talking photo: need exactly one face, found {len(faces)}")
        face = landmarker.landmarks(image, landmarker.region_from_detection(faces[0]))
        if face is None:
            raise ValueError("talking photo: the landmark model sees no face")
        self.image = image
        self.landmarks: FaceLandmarks = face
        xy = face.points[:, :2].astype(np.float64)
        self.origin = (xy[INNER_RIGHT] + xy[INNER_LEFT]) / 2
        ex = xy[INNER_LEFT] - xy[INNER_RIGHT]
        self.half_inner = float(np.linalg.norm(ex)) / 2
        self.ex = ex / np.linalg.norm(ex)
        self.ey = np.array([-self.ex[1], self.ex[0]])
        self.mouth_width = float(np.linalg.norm(xy[OUTER_LEFT] - xy[OUTER_RIGHT]))
        self.centre = xy.mean(axis=0)  # the head's pivot for head motion
        local = self._to_mouth(xy)
        w = self.mouth_width
        # Lip edges y(x) on a table: the inner edges bound the slit, the outer ones give the
        # lips' thickness (the part that moves as one piece).
        self._table_x = np.linspace(-self.half_inner, self.half_inner, 65)
        upper = self._edge(local, INNER_UPPER)
        lower = np.maximum(self._edge(local, INNER_LOWER), upper)
        # Where the photograph's mouth is open, its lip edges are taken a little into the
        # lips, so that no sliver of its own teeth is sampled next to the new edge.
        inset = 0.03 * w * np.clip((lower - upper) / 2.0, 0.0, 1.0)
        self._upper, self._lower = upper - inset, lower + inset
        self._gap0 = self._lower - self._upper
        centre_up = float(np.interp(0.0, self._table_x, self._upper))
        centre_low = float(np.interp(0.0, self._table_x, self._lower))
        self.photo_gap = centre_low - centre_up
        outer_up = float(np.interp(0.0, *self._sorted(local, OUTER_UPPER)))
        outer_low = float(np.interp(0.0, *self._sorted(local, OUTER_LOWER)))
        self._upper_thick = max(centre_up - outer_up, 0.05 * w)
        self._lower_thick = max(outer_low - centre_low, 0.05 * w)
        self._chin_depth = max(float(local[CHIN, 1]) - centre_low, 0.5 * w)
        eye_y = float(min(local[EYE_RIGHT, 1], local[EYE_LEFT, 1]))
        # The box the field lives in: it stops well short of the eyes and below the chin.
        self._box_x = 1.3 * w
        self._box_top = max(-0.9 * w, 0.6 * eye_y)
        self._box_bottom = centre_low + self._chin_depth + 0.8 * w
        self._skin, self._exposure = self._skin_tone(local)
        self._prepare_grid()

    # Geometry helpers ---------------------------------------------------------------------

    def _to_mouth(self, xy: np.ndarray) -> np.ndarray:
        d = xy - self.origin
        return np.stack([d @ self.ex, d @ self.ey], axis=-1)

    @staticmethod
    def _sorted(local: np.ndarray, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        points = local[list(indices)]
        order = np.argsort(points[:, 0])
        return points[order, 0], points[order, 1]

    def _edge(self, local: np.ndarray, indices: Sequence[int]) -> np.ndarray:
        xs, ys = self._sorted(local, indices)
        # The corners are the frame's x axis by construction: pin them there.
        xs = np.concatenate([[-self.half_inner], xs, [self.half_inner]])
        ys = np.concatenate([[0.0], ys, [0.0]])
        return np.interp(self._table_x, xs, ys)

    def _skin_tone(self, local: np.ndarray) -> tuple[np.ndarray, float]:
        """Mean RGB of the skin between nose and upper lip, and its luminance / 170."""
        w = self.mouth_width
        y = -self._upper_thick - 0.12 * w + np.linspace(-0.05 * w, 0.05 * w, 5)
        x = np.linspace(-0.25 * w, 0.25 * w, 9)
        gx, gy = np.meshgrid(x, y)
        image_xy = self.origin + gx[..., None] * self.ex + gy[..., None] * self.ey
        h, wid = self.image.shape[:2]
        cols = np.clip(np.round(image_xy[..., 0]).astype(int), 0, wid - 1)
        rows = np.clip(np.round(image_xy[..., 1]).astype(int), 0, h - 1)
        skin = self.image[rows, cols].reshape(-1, 3).astype(np.float32).mean(axis=0)
        luminance = float(skin @ np.array([0.299, 0.587, 0.114], np.float32))
        return skin, float(np.clip(luminance / 170.0, 0.5, 1.3))

    def _prepare_grid(self) -> None:
        """The image box around the field, and its coarse grid in mouth coordinates."""
        corners = np.array([[sx * self._box_x, y] for sx in (-1, 1)
                            for y in (self._box_top, self._box_bottom)])
        image_corners = self.origin + corners[:, :1] * self.ex + corners[:, 1:] * self.ey
        height, width = self.image.shape[:2]
        x0, y0 = np.floor(image_corners.min(axis=0)).astype(int)
        x1, y1 = np.ceil(image_corners.max(axis=0)).astype(int) + 1
        self.box = (max(0, int(x0)), max(0, int(y0)), min(width, int(x1)), min(height, int(y1)))
        x0, y0, x1, y1 = self.box
        # About 36 samples per mouth width: plenty for fields this smooth.
        self._step = max(1.0, self.mouth_width / 36.0)
        cols = np.arange(x0, x1 + self._step, self._step)
        rows = np.arange(y0, y1 + self._step, self._step)
        gx, gy = np.meshgrid(cols, rows)
        self._q = self._to_mouth(np.stack([gx, gy], axis=-1)).astype(np.float32)
        # Fade to zero towards the box's edges, so the field joins the untouched image.
        qx, qy = self._q[..., 0], self._q[..., 1]
        fade_x = _smoothstep((self._box_x - np.abs(qx)) / (0.35 * self._box_x))
        fade_top = _smoothstep((qy - self._box_top) / (0.4 * -self._box_top))
        fade_bottom = _smoothstep((self._box_bottom - qy) / (0.3 * self._box_bottom))
        # Read at target points though the field is a function of source points: where the
        # taper is not 1, displacements are small and the difference is negligible.
        self._taper = (fade_x * fade_top * fade_bottom).astype(np.float32)
        # Every box pixel's place on the coarse grid, and its mouth-frame x.
        box_cols, box_rows = np.meshgrid(np.arange(x0, x1, dtype=np.float32),
                                         np.arange(y0, y1, dtype=np.float32))
        self._fine_col = ((box_cols - x0) / self._step).astype(np.float32)
        self._fine_row = ((box_rows - y0) / self._step).astype(np.float32)
        self._fine_x = self._to_mouth(np.stack([box_cols, box_rows], -1))[..., 0].astype(
            np.float32)

    # The field ----------------------------------------------------------------------------

    def _lens(self, x: np.ndarray) -> np.ndarray:
        """Shape of an open slit along x: 1 in the middle, 0 at the corners."""
        u = np.clip(1.0 - (x / self.half_inner) ** 2, 0.0, 1.0)
        return u ** np.float32(0.7)

    def _field(self, p: np.ndarray, gap: float, scale: float, lower: bool) -> np.ndarray:
        """Displacement [.., 2] of source points `p` [.., 2] on one side of the slit."""
        w = self.mouth_width
        x, y = p[..., 0], p[..., 1]
        change = gap * self._lens(x) - np.interp(x, self._table_x, self._gap0).astype(np.float32)
        half_outer = w / 2
        spread = (scale - 1) * x * np.exp(0.5 - (x * x) / np.float32(2 * half_outer ** 2))
        if lower:
            depth = y - np.interp(x, self._table_x, self._lower).astype(np.float32)
            # Near the slit the lip follows the slit's shape; lower down the jaw moves as
            # one piece, wider than the mouth, then the neck takes up the motion.
            blend = _smoothstep(depth / np.float32(self._lower_thick + 0.1 * w))
            centre_change = gap - self.photo_gap
            jaw = centre_change * np.exp(-(x * x) / np.float32(2 * (0.7 * w) ** 2))
            dy = (1 - UPPER_SHARE) * ((1 - blend) * change + blend * jaw) * _falloff(
                depth - self._chin_depth, 0.45 * w)
            dx = spread * _falloff(depth - self._lower_thick, 0.4 * w)
        else:
            height = np.interp(x, self._table_x, self._upper).astype(np.float32) - y
            dy = -UPPER_SHARE * change * _falloff(height - self._upper_thick, 0.25 * w)
            dx = spread * _falloff(height - self._upper_thick, 0.3 * w)
        return np.stack([dx, dy], axis=-1) * self._taper[..., None]

    def _inverse(self, gap: float, scale: float, lower: bool) -> tuple[np.ndarray, np.ndarray]:
        """Source points of the grid's target points on one side, and how far inside that
        side's lip they fall (negative: in the opening)."""
        q = self._q
        p = q.copy()
        # Fixed point p = q - D(p): converges because the field's slope stays well under 1.
        for _ in range(4):
            p = q - self._field(p, gap, scale, lower)
        x, y = p[..., 0], p[..., 1]
        if lower:
            inside = y - np.interp(x, self._table_x, self._lower).astype(np.float32)
        else:
            inside = np.interp(x, self._table_x, self._upper).astype(np.float32) - y
        return p, inside

    def frame(self, opening: float, width: float, dx: float = 0.0, dy: float = 0.0,
              angle_deg: float = 0.0) -> np.ndarray:
        """The photograph with its mouth at (opening, width) (`drivers.sim.mouth` units), then
        the whole head shifted by (dx, dy) px and turned by angle_deg about its centre."""
        gap = float(np.clip(opening, 0.0, 1.2)) * MAX_GAP * self.mouth_width
        scale = width_scale(float(np.clip(width, 0.0, 1.0)))
        source_up, inside_up = self._inverse(gap, scale, lower=False)
        source_low, inside_low = self._inverse(gap, scale, lower=True)
        # Each side's map is smooth, so each is brought to full size on its own and the side
        # is chosen per pixel: the slit stays sharp however coarse the grid.
        sources = self._to_box(self._to_image(np.concatenate([source_up, source_low], -1)))
        depths = self._to_box(np.stack([inside_up, inside_low], axis=-1))
        # Where both sides claim a pixel (lips pressed together), the one it lies deeper in.
        use_upper = (depths[..., 0] >= depths[..., 1])[..., None]
        maps = np.where(use_upper, sources[..., :2], sources[..., 2:])
        map_x, map_y = np.ascontiguousarray(maps[..., 0]), np.ascontiguousarray(maps[..., 1])
        x0, y0, x1, y1 = self.box
        warped = cv2.remap(self.image, map_x, map_y, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        out = self.image.copy()
        out[y0:y1, x0:x1] = self._paint_opening(warped, depths[..., 0], depths[..., 1], gap)
        if dx or dy or angle_deg:
            matrix = cv2.getRotationMatrix2D((float(self.centre[0]), float(self.centre[1])),
                                             -angle_deg, 1.0)
            matrix[:, 2] += (dx, dy)
            out = cv2.warpAffine(out, matrix, (out.shape[1], out.shape[0]),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        return out

    def _to_image(self, local: np.ndarray) -> np.ndarray:
        """Mouth-frame points [.., 2k] -> image pixels, float32."""
        flat = local.reshape(*local.shape[:-1], -1, 2)
        xy = (self.origin.astype(np.float32) + flat[..., :1] * self.ex.astype(np.float32)
              + flat[..., 1:] * self.ey.astype(np.float32))
        return np.ascontiguousarray(xy.reshape(local.shape), np.float32)

    def _to_box(self, coarse: np.ndarray) -> np.ndarray:
        """Coarse-grid values [rows, cols, c] -> every pixel of the box (bilinear)."""
        return cv2.remap(coarse, self._fine_col, self._fine_row, cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    def _paint_opening(self, warped: np.ndarray, inside_up: np.ndarray,
                       inside_low: np.ndarray, gap: float) -> np.ndarray:
        """Paint the inside of the mouth where neither lip covers the pixel: a dark cavity,
        the upper teeth under the upper lip, the lower teeth when the jaw is well open."""
        depth = np.maximum(inside_up, inside_low)  # < 0: in the opening
        below_upper, above_lower = -inside_up, -inside_low
        local_gap = np.maximum(below_upper + above_lower, 0.0)
        # One pixel of anti-aliasing at the lips' edges; a sub-pixel opening (the lip line,
        # where the two sides merely touch) is painted only in proportion.
        alpha = np.clip(0.5 - depth, 0.0, 1.0) * np.clip(local_gap, 0.0, 1.0)
        rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        if rows.size == 0:
            return warped
        # Paint only the opening's bounding box: a small part of the warped box.
        part = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        alpha, below_upper, above_lower = alpha[part], below_upper[part], above_lower[part]
        local_gap, fine_x = local_gap[part], self._fine_x[part]
        w = self.mouth_width
        across = _smoothstep((0.8 * self.half_inner - np.abs(fine_x)) / (0.25 * self.half_inner))
        upper_teeth = np.minimum(0.1 * w, 0.5 * local_gap)
        teeth = np.clip(upper_teeth - below_upper + 0.5, 0.0, 1.0) * across
        lower_show = float(_smoothstep(np.float32((gap - 0.12 * w) / (0.1 * w))))
        if lower_show > 0:
            lower_teeth = np.minimum(0.05 * w, 0.3 * local_gap) * lower_show
            teeth = np.maximum(teeth, np.clip(lower_teeth - above_lower + 0.5, 0.0, 1.0)
                               * across * 0.8)
        # Darker towards the middle of the cavity, teeth darker towards the corners and in
        # the upper lip's shadow.
        middle = _smoothstep(np.minimum(below_upper, above_lower) / (0.08 * w))
        cavity = np.float32(self._exposure) * np.array([58, 24, 27], np.float32)
        cavity = cavity * (1 - 0.5 * middle)[..., None]
        enamel = 0.5 * self._skin + 0.5 * self._exposure * np.array([220, 212, 196])
        shade = ((0.65 + 0.35 * (1 - np.abs(fine_x) / self.half_inner).clip(0, 1))
                 * (0.75 + 0.25 * _smoothstep(below_upper / (0.04 * w))))
        teeth_rgb = enamel.astype(np.float32) * shade[..., None]
        inside = cavity + (teeth_rgb - cavity) * teeth[..., None]
        region = warped[part].astype(np.float32)
        region += (inside - region) * alpha[..., None]
        warped[part] = np.clip(region + 0.5, 0, 255).astype(np.uint8)
        return warped


# Tracks, head motion, video ------------------------------------------------------------------

@dataclass(frozen=True)
class SpokenTrack:
    """The mouth of an utterance said from clip time `start_s` (a `TrackFn`): phonemes in the
    utterance's own time, lips leading the voice by `lead_s`, resting outside it."""

    phonemes: tuple[Phoneme, ...]
    start_s: float
    duration_s: float
    lead_s: float = 0.0

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def __call__(self, times_s: np.ndarray) -> np.ndarray:
        local = np.asarray(times_s, np.float64) - self.start_s + self.lead_s
        return mouth_track(self.phonemes, self.duration_s, local)

    def speaking(self, times_s: np.ndarray) -> np.ndarray:
        """bool [T]: between the first and the last sounding phoneme (pauses are "_...")."""
        sounding = [i for i, p in enumerate(self.phonemes) if not p.name.startswith("_")]
        if not sounding:
            return np.zeros(len(times_s), bool)
        starts = [p.start_s for p in self.phonemes] + [self.duration_s]
        begin = self.start_s + starts[sounding[0]]
        end = self.start_s + starts[sounding[-1] + 1]
        times = np.asarray(times_s, np.float64)
        return (times >= begin) & (times < end)


def spoken_track(text: str, voice: str = "en-us", start_s: float = 0.3,
                 lead_s: float = 0.0) -> SpokenTrack:
    """`text` said by espeak-ng (`drivers.sim.espeak`; needs the library) from `start_s`."""
    from drivers.sim.espeak import Espeak

    utterance = Espeak().synthesise(text, voice)
    duration = len(utterance.samples) / utterance.sample_rate
    return SpokenTrack(utterance.phonemes, start_s, duration, lead_s)


@dataclass(frozen=True)
class StillTrack:
    """A face that does not talk (a `TrackFn`): the rest shape plus the small idle jaw motion
    of the training clips (`training.speech_corpus.Clip.frame_at`: up to 0.08 at 0.2-1 Hz)."""

    jaw: float = 0.04
    rate_hz: float = 0.5
    phase: float = 0.0

    @classmethod
    def random(cls, rng: np.random.Generator) -> StillTrack:
        return cls(float(rng.uniform(0, 0.08)), float(rng.uniform(0.2, 1.0)),
                   float(rng.uniform(0, 2 * np.pi)))

    def __call__(self, times_s: np.ndarray) -> np.ndarray:
        times = np.asarray(times_s, np.float64)
        jaw = self.jaw * (0.5 + 0.5 * np.sin(2 * np.pi * self.rate_hz * times + self.phase))
        return np.stack([REST[0] + jaw, np.full_like(times, REST[1])], axis=-1)


@dataclass(frozen=True)
class HeadMotion:
    """A slow sway of the whole head (amplitude as a fraction of the mouth width) and a tilt,
    shaped as the training clips' head motion."""

    sway: float = 0.0
    frequency_hz: float = 0.3
    phase: float = 0.0
    tilt_deg: float = 0.0

    @classmethod
    def random(cls, rng: np.random.Generator) -> HeadMotion:
        return cls(float(rng.uniform(0.05, 0.4)), float(rng.uniform(0.1, 0.6)),
                   float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 4)))

    def at(self, t_s: float, mouth_width: float) -> tuple[float, float, float]:
        """(dx px, dy px, angle degrees) at time t_s."""
        a = self.sway * mouth_width
        omega = 2 * np.pi * self.frequency_hz
        return (float(a * np.sin(omega * t_s + self.phase)),
                float(0.5 * a * np.cos(0.7 * omega * t_s + self.phase)),
                float(self.tilt_deg * np.sin(0.5 * omega * t_s)))


def video(photo: TalkingPhoto, track: np.ndarray, times_s: np.ndarray | None = None,
          head: HeadMotion | None = None) -> list[np.ndarray]:
    """Frames (RGB uint8) of `photo` with its mouth on `track` [T, 2] (opening, width) at
    `times_s` (default 25 fps from 0), the head moving as `head`."""
    track = np.asarray(track, np.float64)
    if track.ndim != 2 or track.shape[1] != 2:
        raise ValueError(f"track must be [T, 2] (opening, width), got {track.shape}")
    times = (np.arange(len(track)) / 25.0 if times_s is None
             else np.asarray(times_s, np.float64))
    if len(times) != len(track):
        raise ValueError(f"{len(track)} mouth shapes for {len(times)} times")
    head = head or HeadMotion()
    return [photo.frame(float(o), float(w), *head.at(float(t), photo.mouth_width))
            for (o, w), t in zip(track, times, strict=True)]


# The node's mouth path -----------------------------------------------------------------------

@dataclass(frozen=True)
class MouthWindow:
    """The speech model's inputs for the window ending at clip time `t_end_s`, as the node's
    speech binding made them: `video` [16, 48, 48] float32 crops in [0, 1] (zeros where no
    face was found or no frame is recent enough), `valid` [16] float32, and all of the
    binding's feeds (batch of 1: audio_mel, audio_valid, video, video_valid)."""

    video: np.ndarray
    valid: np.ndarray
    slots_s: np.ndarray  # clip time of each slot, oldest first
    t_end_s: float
    feeds: dict[str, np.ndarray]


def track_crops(frames: Sequence[np.ndarray], tracker: MouthTracker
                ) -> list[np.ndarray | None]:
    """Each frame through the node's mouth path in capture order, as the speech binding's
    `tracked_crop`: the tracker's mouth region, then `mouth_crop`; None where it finds none."""
    crops: list[np.ndarray | None] = []
    for image in frames:
        roi = tracker(image, "rgb8")
        crop = None
        if roi is not None:
            try:
                crop = mouth_crop(image, "rgb8", roi)
            except EngineError:  # the mouth lies wholly outside the frame
                crop = None
        crops.append(crop)
    return crops


_AUDIO, _CAMERA = "audio.mic0", "camera.front"
_ORIGIN_NS = 10_000_000_000  # clip time 0 on the node's clock: earlier times stay positive
_CHUNK = SPEECH_SAMPLE_RATE // 100  # 10 ms microphone chunks, as launch/webcam.toml


def mouth_windows(photo: str | TalkingPhoto, track_fn: TrackFn, ends_s: Sequence[float], *,
                  head: HeadMotion | None = None, audio: np.ndarray | None = None,
                  fps: float = 30.0, rate_hz: float = 30.0, phase_s: float = 0.0,
                  warmup_s: float = 0.5) -> list[MouthWindow]:
    """The speech model's inputs for windows ending at clip times `ends_s`, made by the node's
    own code, in the order of `ends_s`.

    Frames of `photo` (mouth on `track_fn`, head moving as `head`) from a camera at `fps`
    (captured at phase_s + k / fps) and `audio` (float32 mono at 16 kHz, sample 0 at clip
    time 0, silence before; None: silence) go into an `AlignmentBuffer`; a `SpeechBinding`
    with mouth_roi = "landmarks" cuts a window at every tick of the engine (`rate_hz`, from
    `warmup_s` before the first window's oldest slot, and at each end), as launch/webcam.toml
    runs it (30 fps webcam, speech engine at 30 Hz). So the tracker sees the frames the
    node's windows use, in capture order, and slot k of a window ending at t holds the newest
    frame at or before t - (15 - k) * 40 ms. fps = rate_hz = 25 is the training clips' camera.
    """
    photo = talking_photo(photo) if isinstance(photo, str) else photo
    if len(ends_s) == 0:
        return []
    head = head or HeadMotion()
    period_s = SPEECH_VIDEO_PERIOD_NS / 1e9
    first_s = min(ends_s) - (SPEECH_VIDEO_FRAMES - 1) * period_s - warmup_s
    ends_ns = [round(t * 1e9) for t in ends_s]
    # Ticks: the engine's grid leading up to each end, and the ends themselves.
    ticks = set(ends_ns)
    for end in ends_s:
        ticks.update(round((end - back) * 1e9) for back in np.arange(0, end - first_s,
                                                                      1 / rate_hz))
    if audio is None:
        audio = np.zeros(int((max(ends_s) + 0.1) * SPEECH_SAMPLE_RATE) + 1, np.float32)
    # Silence before clip time 0, so that the warm-up windows have their audio too.
    lead = max(0, math.ceil((0.7 - first_s) * 100)) * _CHUNK
    audio = np.concatenate([np.zeros(lead, np.float32), np.asarray(audio, np.float32)])
    chunks = len(audio) // _CHUNK
    buffer = AlignmentBuffer({_AUDIO: chunks + 1, _CAMERA: 64})
    audio_start_ns = _ORIGIN_NS - lead * 1_000_000_000 // SPEECH_SAMPLE_RATE
    for k in range(chunks):
        buffer.push(AudioChunk(_AUDIO, k, audio_start_ns + k * 10_000_000, SPEECH_SAMPLE_RATE,
                               k * _CHUNK, audio[k * _CHUNK:(k + 1) * _CHUNK, None]))
    binding = SpeechBinding(_AUDIO, _CAMERA, "landmarks")
    frame_index = math.ceil((first_s - phase_s) * fps - 1e-9)
    found: dict[int, MouthWindow] = {}
    for tick_ns in sorted(ticks):
        # The camera has delivered every frame captured up to this tick.
        while round((phase_s + frame_index / fps) * 1e9) <= tick_ns:
            t = phase_s + frame_index / fps
            opening, width = track_fn(np.array([t]))[0]
            image = photo.frame(float(opening), float(width), *head.at(t, photo.mouth_width))
            buffer.push(Frame(_CAMERA, frame_index, _ORIGIN_NS + round(t * 1e9), image))
            frame_index += 1
        window = buffer.window(_ORIGIN_NS + tick_ns, binding.spec)
        if _AUDIO not in window.data:
            raise ValueError(f"no audio for the window at {tick_ns / 1e9:.3f} s: "
                             f"{window.missing.get(_AUDIO)}")
        feeds = binding.feeds(window)  # tracks and crops the frames new to this window
        if tick_ns in ends_ns:
            slots = (tick_ns - SPEECH_VIDEO_PERIOD_NS
                     * np.arange(SPEECH_VIDEO_FRAMES - 1, -1, -1)) / 1e9
            found[tick_ns] = MouthWindow(feeds["video"][0], feeds["video_valid"][0], slots,
                                         tick_ns / 1e9, feeds)
    return [found[t] for t in ends_ns]


# The check -----------------------------------------------------------------------------------

def lip_gap(face: FaceLandmarks) -> float:
    """Inner-lip gap over mouth width, as the landmarker measures it."""
    upper, lower, _, _ = face.mouth()
    outer = face.points[[OUTER_RIGHT, OUTER_LEFT], :2]
    return float(np.linalg.norm(lower - upper) / np.linalg.norm(outer[1] - outer[0]))


def check(name: str, texts: Sequence[str] = CHECK_TEXTS, voice: str = "en-us",
          scale: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Talking and still sequences of one photograph (frames resized by `scale`, as a face
    further away) through the node's mouth path at 25 fps: how often the tracker finds the
    mouth, how well the landmarker's lip gap and corner distance follow the commanded
    opening and width, how much the crops move, and the warp's cost."""
    rng = np.random.default_rng(seed)
    photo = talking_photo(name)
    head = HeadMotion(sway=0.2, frequency_hz=0.4, phase=float(rng.uniform(0, 6)), tilt_deg=3)
    tracks, spans = [], []
    start_s = 0.0
    for text in texts:  # one utterance after another, with a rest between
        spoken = spoken_track(text, voice, start_s=start_s + 0.3)
        tracks.append(spoken)
        spans.append((start_s, spoken.end_s + 0.3))
        start_s = spoken.end_s + 0.3
    times = np.arange(0.0, start_s, 1 / 25)
    talking = np.concatenate([t(times[(times >= a) & (times < b)])
                              for t, (a, b) in zip(tracks, spans, strict=True)])
    begin = time.perf_counter()
    frames = video(photo, talking, times, head)
    warp_ms = (time.perf_counter() - begin) / len(frames) * 1e3
    still_frames = video(photo, StillTrack(0.04, 0.5)(times), times, head)
    if scale != 1.0:
        frames, still_frames = ([cv2.resize(f, None, fx=scale, fy=scale,
                                            interpolation=cv2.INTER_AREA) for f in seq]
                                for seq in (frames, still_frames))
    landmarker = _landmarker()
    gaps, widths = [], []
    for image in frames:
        face = landmarker(image)
        gaps.append(lip_gap(face) if face is not None else np.nan)
        widths.append(corner_distance(face) if face is not None else np.nan)
    crops = track_crops(frames, MouthTracker(landmarker))
    stack = np.stack([c if c is not None else np.zeros((48, 48), np.float32) for c in crops])
    still = [c for c in track_crops(still_frames, MouthTracker(landmarker)) if c is not None]
    gaps_array, widths_array = np.array(gaps), np.array(widths)
    seen = np.isfinite(gaps_array)
    # Width is only visible while the lips are apart enough to shape: where opening > 0.1.
    shaped = seen & (talking[:, 0] > 0.1)
    return {
        "frames": float(len(frames)),
        "found": sum(c is not None for c in crops) / len(crops),
        "still_found": len(still) / len(still_frames),
        "gap_correlation": float(np.corrcoef(gaps_array[seen], talking[seen, 0])[0, 1]),
        "width_correlation": float(np.corrcoef(widths_array[shaped],
                                               talking[shaped, 1])[0, 1]),
        "crop_motion_talking": float(stack.std(axis=0).mean()),
        "crop_motion_still": float(np.stack(still).std(axis=0).mean()),
        "warp_ms": warp_ms,
    }


def corner_distance(face: FaceLandmarks) -> float:
    """Outer mouth-corner distance over the outer eye-corner distance (a face-size unit)."""
    xy = face.points[:, :2]
    return float(np.linalg.norm(xy[OUTER_LEFT] - xy[OUTER_RIGHT])
                 / np.linalg.norm(xy[EYE_LEFT] - xy[EYE_RIGHT]))


def frame_cost_ms(photo: TalkingPhoto, frames: int = 50) -> float:
    """Milliseconds per `TalkingPhoto.frame` (no head motion), over random shapes."""
    rng = np.random.default_rng(0)
    shapes = rng.uniform(0, 1, (frames, 2))
    begin = time.perf_counter()
    for opening, width in shapes:
        photo.frame(float(opening), float(width))
    return (time.perf_counter() - begin) / frames * 1e3


if __name__ == "__main__":
    for photo_name in photographs():
        print(photo_name, f"warp_only_ms={frame_cost_ms(talking_photo(photo_name)):.2f}")
        for size in (1.0, 0.5):
            report = check(photo_name, scale=size)
            print(f"  scale={size}", " ".join(f"{k}={v:.3f}" for k, v in report.items()))
