"""klettres-data's real speech (training/real_speech.py): speaker splits, loading, the
command-like texts."""

from __future__ import annotations

import numpy as np
import pytest

from training import real_speech
from training.real_speech import (
    REAL_SPLITS,
    RealSpeechError,
    is_command_like,
    load,
    recordings,
    speakers,
)

pytestmark = pytest.mark.skipif(not speakers(), reason="klettres-data is not installed")


def test_splits_are_disjoint_and_cover_every_speaker():
    sets = {split: set(names) for split, names in REAL_SPLITS.items()}
    assert set(REAL_SPLITS) == {"train", "validation", "test"}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert set().union(*sets.values()) == set(speakers())
    assert 4 <= len(sets["test"]) <= 5 and 2 <= len(sets["validation"]) <= 3
    # One English folder in test, the other in train.
    assert "en_GB" in sets["test"] and "en" in sets["train"]


def test_recordings_follow_the_split_and_have_texts():
    seen = set()
    for split, names in REAL_SPLITS.items():
        items = recordings(split)
        assert len(items) >= 200
        assert {r.speaker for r in items} == set(names)
        assert all(r.path.is_file() and r.path.suffix == ".ogg" and r.text for r in items)
        paths = {r.path for r in items}
        assert len(paths) == len(items) and not paths & seen
        seen |= paths
    english = {r.text for r in recordings("test") if r.speaker == "en_GB"}
    assert {"A", "Z", "DOG", "WELL"} <= english
    with pytest.raises(RealSpeechError):
        recordings("dev")


def test_recordings_load_as_16khz_speech():
    for split in REAL_SPLITS:
        items = recordings(split)
        for recording in items[:: max(1, len(items) // 12)]:
            samples = load(recording)
            assert samples.dtype == np.float32 and samples.ndim == 1
            assert 0.2 < len(samples) / 16_000 < 8.0
            assert np.isfinite(samples).all()
            peak = float(np.abs(samples).max())
            assert 0.02 < peak <= 1.0
            assert np.sqrt(np.mean(samples ** 2)) > 1e-3


def test_broken_levels_and_odd_channels_are_tamed():
    # tn's broken encodes decode far above full scale; ar's a-07 has out-of-phase channels.
    odd = [r for s in ("tn", "ar") for r in recordings("train") if r.speaker == s
           and r.path.name in ("fa.ogg", "ga.ogg", "a-07.ogg")]
    assert len(odd) == 3
    for recording in odd:
        samples = load(recording)
        assert 0.5 < float(np.abs(samples).max()) <= 1.0


def test_load_split_is_cached_and_read_only():
    first = real_speech.load_split("validation")
    assert real_speech.load_split("validation") is first
    recording, samples = first[0]
    assert recording == recordings("validation")[0]
    assert not samples.flags.writeable
    assert np.array_equal(samples, load(recording))


def test_command_like_texts_are_flagged():
    for text in ("GO", "go", "Stop", "OP", "AAP", "OOM", "up"):
        assert is_command_like(text), text
    for text in ("A", "G", "NO", "DOG", "KO", "GOT", "ROT", "HÓ", "BLUE SKY", ""):
        assert not is_command_like(text), text
    flagged = {(r.speaker, r.text) for split in REAL_SPLITS for r in recordings(split)
               if is_command_like(r.text)}
    assert flagged == {("es", "GO"), ("it", "GO"), ("pt_BR", "GO"), ("da", "OP"),
                       ("nl", "OP"), ("nl", "AAP"), ("nl", "OOM")}
