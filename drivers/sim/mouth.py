"""A drawn mouth driven by phonemes: visemes, coarticulation, appearance and rendering.

Shared by the speech corpus generator and the simulated camera, so that what the speech
model is trained on is exactly what the simulated pipeline shows it. numpy and OpenCV only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from drivers.sim.espeak import Phoneme

ROI_WIDTH = 128
ROI_HEIGHT = 96
"""Size of the mouth region the renderer draws; the simulated camera's MOUTH_ROI size."""

REST = (0.02, 0.55)
"""(opening, width) of a relaxed closed mouth."""

# espeak-ng phoneme mnemonics -> (opening, width), both in [0, 1]. Rounded vowels narrow the
# mouth, open vowels drop the jaw, bilabials close it, spread vowels widen it.
_BILABIAL = {"p", "b", "m"}
_LABIODENTAL = {"f", "v"}
_ROUNDED = {"w", "u:", "U", "oU", "O:", "OI", "0", "o", "O", "u", "aU", "o@", "U@", "O@"}
_OPEN = {"a", "A:", "aI", "V", "a#", "A@", "aa", "a@", "A"}
_MID = {"e", "E", "eI", "3:", "@", "e@", "3", "@L", "@2", "@5", "I2", "I#", "i@", "i@3"}
_SPREAD = {"i", "i:", "I", "j", "I@"}
_POSTALVEOLAR = {"S", "Z", "tS", "dZ", "r", "r-"}


def viseme(phoneme: str) -> tuple[float, float]:
    """(opening, width) target of an espeak-ng phoneme mnemonic."""
    name = phoneme.rstrip("2345;'")
    if name.startswith("_") or not name:
        return REST
    if name in _BILABIAL:
        return (0.0, 0.5)
    if name in _LABIODENTAL:
        return (0.08, 0.6)
    if name in _ROUNDED:
        return (0.4, 0.25)
    if name in _OPEN:
        return (0.9, 0.7)
    if name in _MID:
        return (0.55, 0.7)
    if name in _SPREAD:
        return (0.25, 0.9)
    if name in _POSTALVEOLAR:
        return (0.25, 0.35)
    return (0.25, 0.6)


def mouth_track(phonemes: Sequence[Phoneme], end_s: float, times_s: np.ndarray,
                smoothing_s: float = 0.03) -> np.ndarray:
    """Mouth shape [len(times_s), 2] (opening, width) at `times_s` (utterance time, s).

    Each phoneme holds its viseme until the next starts; the result is averaged over
    ±`smoothing_s` (coarticulation: lips move towards the next sound before it starts).
    Outside the utterance the mouth rests.
    """
    starts = np.array([p.start_s for p in phonemes] + [end_s])
    targets = np.array([viseme(p.name) for p in phonemes] + [REST])
    offsets = np.linspace(-smoothing_s, smoothing_s, 7)
    sample_times = np.asarray(times_s)[:, None] + offsets[None, :]
    index = np.searchsorted(starts, sample_times, side="right") - 1
    shape = targets[np.clip(index, 0, len(targets) - 1)]
    shape[(index < 0) | (sample_times >= end_s)] = REST
    return shape.mean(axis=1)


@dataclass(frozen=True)
class Appearance:
    """How one person's mouth region looks (colours are RGB)."""

    skin: tuple[int, int, int]
    lips: tuple[int, int, int]
    mouth_half_width: float  # px at width 1
    lip_thickness: float  # px
    max_opening: float  # px of inner half-height at opening 1
    teeth: bool


SKIN_TONES = (
    (241, 194, 167), (224, 172, 138), (198, 134, 96), (161, 102, 66), (120, 74, 48),
    (88, 56, 38), (236, 188, 150), (210, 160, 120), (176, 120, 84), (140, 90, 60),
)
LIP_COLOURS = (
    (170, 70, 80), (150, 50, 60), (190, 100, 110), (120, 45, 50), (200, 80, 100),
    (140, 70, 70), (175, 90, 95), (110, 55, 60), (185, 60, 75), (160, 85, 90),
)


def random_appearance(rng: np.random.Generator, skins: Sequence[int],
                      lips: Sequence[int]) -> Appearance:
    """An appearance from the given palette indices (splits use disjoint indices)."""
    return Appearance(
        skin=SKIN_TONES[int(rng.choice(skins))],
        lips=LIP_COLOURS[int(rng.choice(lips))],
        mouth_half_width=float(rng.uniform(30, 44)),
        lip_thickness=float(rng.uniform(3.5, 7.0)),
        max_opening=float(rng.uniform(16, 26)),
        teeth=bool(rng.random() < 0.7),
    )


def render_mouth(appearance: Appearance, opening: float, width: float,
                 dx: float = 0.0, dy: float = 0.0, angle_deg: float = 0.0,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Draw the mouth region (ROI_HEIGHT x ROI_WIDTH RGB uint8), mouth centred + (dx, dy)."""
    image = out if out is not None else np.empty((ROI_HEIGHT, ROI_WIDTH, 3), np.uint8)
    image[:] = appearance.skin
    # Fixed-point (4 fractional bits) so sub-pixel head motion is drawn, not rounded away.
    shift = 4
    scale = 1 << shift
    centre = (round((ROI_WIDTH / 2 + dx) * scale), round((ROI_HEIGHT / 2 + dy) * scale))
    half_width = appearance.mouth_half_width * (0.7 + 0.5 * width)
    inner = max(0.0, opening) * appearance.max_opening
    outer_axes = (round(half_width * scale),
                  round((appearance.lip_thickness + inner) * scale))
    cv2.ellipse(image, centre, outer_axes, angle_deg, 0, 360, appearance.lips, -1,
                cv2.LINE_AA, shift)
    if inner > 0.5:
        inner_axes = (round(half_width * 0.85 * scale), round(inner * scale))
        cv2.ellipse(image, centre, inner_axes, angle_deg, 0, 360, (35, 12, 15), -1,
                    cv2.LINE_AA, shift)
        if appearance.teeth and inner > 3:
            # Upper teeth: the top part of the opening.
            top = (centre[0], centre[1] - round(inner * 0.55 * scale))
            teeth_axes = (round(half_width * 0.6 * scale), round(inner * 0.35 * scale))
            cv2.ellipse(image, top, teeth_axes, angle_deg, 0, 360, (235, 235, 225), -1,
                        cv2.LINE_AA, shift)
    else:
        # A closed mouth still shows the line between the lips.
        a = math.radians(angle_deg)
        ex, ey = half_width * math.cos(a), half_width * math.sin(a)
        cv2.line(image, (centre[0] - round(ex * scale), centre[1] - round(ey * scale)),
                 (centre[0] + round(ex * scale), centre[1] + round(ey * scale)),
                 (60, 20, 25), 2, cv2.LINE_AA, shift)
    return image
