"""Real face photographs whose mouths talk (training/real_faces.py), checked through the
node's own face landmarker, mouth tracker, mouth crop and speech binding."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.sim.espeak import Phoneme
from drivers.sim.mouth import REST
from engines.face import FaceLandmarker, MouthTracker

pytest.importorskip("skimage.data")

from training.real_faces import (  # after the skip: needs scikit-image's photos
    EYE_LEFT,
    EYE_RIGHT,
    HeadMotion,
    SpokenTrack,
    StillTrack,
    TalkingPhoto,
    lip_gap,
    mouth_windows,
    photographs,
    talking_photo,
    track_crops,
    usable,
    video,
)

NAMES = ("astronaut", "grace_hopper")
# "please go left" as espeak-ng en-us times it, so these tests need no espeak-ng.
PLEASE_GO_LEFT = tuple(Phoneme(name, start) for name, start in (
    ("p", 0.048), ("l", 0.086), ("i:", 0.153), ("z", 0.237), ("g", 0.362), ("oU", 0.382),
    ("l", 0.502), ("E", 0.592), ("f", 0.733), ("t", 0.829), ("_:", 0.874), ("_", 0.881)))
HEAD = HeadMotion(sway=0.2, frequency_hz=0.4, phase=1.0, tilt_deg=3.0)


@pytest.fixture(scope="module")
def landmarker() -> FaceLandmarker:
    return FaceLandmarker()


@pytest.fixture(scope="module", params=NAMES)
def photo(request) -> TalkingPhoto:
    if request.param not in photographs():
        pytest.skip(f"{request.param} is not installed")
    return talking_photo(request.param)


def talking() -> SpokenTrack:
    return SpokenTrack(PLEASE_GO_LEFT, start_s=0.2, duration_s=0.88)


def corners(face) -> float:
    return float(np.linalg.norm(face.points[291, :2] - face.points[61, :2]))


def test_real_photographs_are_found_and_a_profile_is_rejected(landmarker):
    from skimage import data

    photos = photographs()
    assert "astronaut" in photos
    for name, image in photos.items():
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, name
        assert len(landmarker.detect(image)) == 1, name
        assert not image.flags.writeable
    # Read from the package, not copied.
    np.testing.assert_array_equal(photos["astronaut"], data.astronaut())
    # The cameraman is found, but in profile: his lips cannot be animated.
    cameraman = np.repeat(data.camera()[:, :, None], 3, axis=2)
    assert "not frontal" in usable(landmarker, cameraman)
    assert "camera" not in photos


def test_a_photograph_without_a_face_is_refused(landmarker):
    with pytest.raises(ValueError, match="exactly one face"):
        TalkingPhoto(np.full((256, 256, 3), 128, np.uint8), landmarker)


def test_the_lip_gap_the_landmarker_measures_grows_with_opening(photo, landmarker):
    gaps = []
    for opening in (0.0, 0.4, 0.9):
        face = landmarker(photo.frame(opening, 0.7))
        assert face is not None and face.presence > 0.9
        gaps.append(lip_gap(face))
    assert gaps[0] < 0.06, gaps  # closed, even for the astronaut's open smile
    assert gaps[1] > gaps[0] + 0.05 and gaps[2] > gaps[1] + 0.05, gaps


def test_width_moves_the_mouth_corners(photo, landmarker):
    narrow = landmarker(photo.frame(0.4, 0.25))
    spread = landmarker(photo.frame(0.4, 0.9))
    assert corners(spread) > 1.1 * corners(narrow)


def test_the_rest_of_the_face_stays_put(photo, landmarker):
    image = photo.frame(0.9, 0.9)
    x0, y0, x1, y1 = photo.box
    outside = np.ones(image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(image[outside], photo.image[outside])
    # The eyes lie outside the warped box.
    eyes = photo.landmarks.points[[EYE_RIGHT, EYE_LEFT, 133, 362, 159, 145, 386, 374], :2]
    assert eyes[:, 1].max() < y0
    # Seen through the same face crop, the landmark model puts the eyes where they were.
    before = landmarker(photo.image)
    after = landmarker.landmarks(image, before.region)
    eye_span = np.linalg.norm(before.points[EYE_LEFT, :2] - before.points[EYE_RIGHT, :2])
    for index in (EYE_RIGHT, EYE_LEFT):
        moved = np.linalg.norm(after.points[index, :2] - before.points[index, :2])
        assert moved < 0.02 * eye_span


def test_head_motion_moves_the_whole_face(photo, landmarker):
    still = landmarker(photo.frame(*REST))
    moved = landmarker(photo.frame(*REST, dx=12.0, dy=-6.0))
    shift = (moved.points[:, :2] - still.points[:, :2]).mean(axis=0)
    np.testing.assert_allclose(shift, (12.0, -6.0), atol=1.5)
    tilted = landmarker(photo.frame(*REST, angle_deg=5.0))
    eyes = tilted.points[EYE_LEFT, :2] - tilted.points[EYE_RIGHT, :2]
    level = still.points[EYE_LEFT, :2] - still.points[EYE_RIGHT, :2]
    turned = np.degrees(np.arctan2(eyes[1], eyes[0]) - np.arctan2(level[1], level[0]))
    assert 3.5 < turned < 6.5  # positive angle_deg turns clockwise on screen


def test_the_mouth_tracker_follows_a_talking_face(photo, landmarker):
    times = np.arange(0.0, 1.3, 0.04)
    track = talking()(times)
    frames = video(photo, track, times, HEAD)
    crops = track_crops(frames, MouthTracker(landmarker))
    assert all(c is not None and c.shape == (48, 48) and c.dtype == np.float32 for c in crops)
    gaps = np.array([lip_gap(landmarker(f)) for f in frames])
    assert np.corrcoef(gaps, track[:, 0])[0, 1] > 0.8
    still_frames = video(photo, StillTrack(0.04, 0.5)(times), times, HEAD)
    still = track_crops(still_frames, MouthTracker(landmarker))
    assert all(c is not None for c in still)
    # The talking mouth changes the crop far more than the idle jaw and the head's sway do.
    assert np.stack(crops).std(axis=0).mean() > 1.5 * np.stack(still).std(axis=0).mean()


def test_mouth_windows_are_what_the_speech_binding_feeds_the_model(photo, landmarker):
    ends = [0.9, 1.1]
    windows = mouth_windows(photo, talking(), ends, head=HEAD, fps=25, rate_hz=25,
                            warmup_s=0.2)
    assert [w.t_end_s for w in windows] == ends
    for window in windows:
        assert window.video.shape == (16, 48, 48) and window.video.dtype == np.float32
        assert 0 <= window.video.min() and window.video.max() <= 1
        assert window.valid.tolist() == [1.0] * 16
        np.testing.assert_allclose(window.slots_s, window.t_end_s - 0.04 * np.arange(15, -1, -1))
        assert window.feeds["video"].shape == (1, 16, 48, 48)
        assert window.feeds["audio_mel"].shape == (1, 64, 40)
    # The same frames through a tracker of our own, in capture order from the same start,
    # give the same crops: the binding tracked every frame once, in order.
    first = min(ends) - 0.6 - 0.2
    times = np.arange(np.ceil(first * 25 - 1e-9), np.floor(max(ends) * 25) + 1) / 25
    frames = video(photo, talking()(times), times, HEAD)
    crops = track_crops(frames, MouthTracker(landmarker))
    for window in windows:
        # Each slot: the newest frame at or before it (the ends are off the camera's grid).
        at = np.searchsorted(times, window.slots_s + 1e-9, side="right") - 1
        np.testing.assert_allclose(window.video, np.stack([crops[i] for i in at]), atol=1e-6)
    still = mouth_windows(photo, StillTrack(0.05, 0.6), [1.1], head=HEAD, fps=25, rate_hz=25)
    assert windows[1].video.std(axis=0).mean() > 1.5 * still[0].video.std(axis=0).mean()


def test_a_webcam_rate_camera_fills_every_slot(photo):
    windows = mouth_windows(photo, StillTrack(), [0.7], fps=30, rate_hz=30, phase_s=0.013)
    assert windows[0].valid.tolist() == [1.0] * 16


def test_tracks_follow_the_drawn_mouths_conventions():
    times = np.arange(0.0, 1.5, 0.04)
    track = talking()
    shape = track(times)
    np.testing.assert_allclose(shape[times < 0.15], np.tile(REST, ((times < 0.15).sum(), 1)))
    assert shape[:, 0].max() > 0.4
    speaking = track.speaking(times)
    assert not speaking[times < 0.24].any() and speaking[(times > 0.3) & (times < 1.0)].all()
    assert not speaking[times > 1.1].any()
    still = StillTrack.random(np.random.default_rng(0))(times)
    assert np.all((still[:, 0] >= REST[0]) & (still[:, 0] <= REST[0] + 0.08))
    np.testing.assert_array_equal(still[:, 1], REST[1])
