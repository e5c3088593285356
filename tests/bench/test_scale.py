"""`bench scale`: the configurations it sweeps, and one short real run of the node."""

from __future__ import annotations

import numpy as np

from drivers.sim.simulated import microphone_samples, voice
from fusion_node.bench.scale import SWEEP, run_scale_bench, scale_config


def test_each_configuration_has_the_cameras_channels_and_engines_it_names():
    for cameras, channels, engines in SWEEP:
        config = scale_config(cameras, channels, engines)
        face_cameras = [d for d in config.drivers if d.kind == "sim_camera"]
        assert len(face_cameras) == cameras
        (mic,) = [d for d in config.drivers if d.kind == "sim_microphone"]
        assert mic.config["channels"] == channels
        names = [e.name for e in config.engines]
        assert names == ["speech", "action", "speech2", "action2"][:engines]
        assert len({e.topic for e in config.engines}) == engines  # one topic each
    assert (4, 1, 2) in SWEEP  # the target: 4 cameras, 1 microphone, both engines


def test_a_multichannel_microphone_hears_one_voice_with_its_own_noise_per_channel():
    # A stretch of the script where the voice speaks.
    t_ns = np.arange(0, 20_000_000_000, 62_500, dtype=np.int64)
    start = int(np.argmax(np.abs(voice(t_ns))))
    t_ns = t_ns[max(0, start - 800):start + 800]
    mono = microphone_samples(t_ns, np.random.default_rng(1))
    again = microphone_samples(t_ns, np.random.default_rng(1), channels=1)
    np.testing.assert_array_equal(mono, again)  # the default stream is unchanged
    quad = microphone_samples(t_ns, np.random.default_rng(1), channels=4)
    assert quad.shape == (len(t_ns), 4) and quad.dtype == np.int16
    noise = quad - (voice(t_ns) * 0.5 * 32768)[:, None]
    assert np.all((noise.std(axis=0) > 20) & (noise.std(axis=0) < 40))  # the noise floor only
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.2  # independent per channel


def test_a_short_sweep_reports_cpu_and_readiness_per_part():
    result = run_scale_bench(duration_s=1.5, sweep=((2, 4, 3),))
    (row,) = result["rows"]
    assert set(row["engines"]) == {"speech", "action", "speech2"}
    for engine in row["engines"].values():
        assert engine["published"] > 0 and engine["ready_after_t_ref_p99_ms"] > 0
    cpu = row["cpu_cores"]
    for part in ("node", "thread receiver", "thread publisher", "thread engine speech2",
                 "driver camera.front", "driver camera.extra1", "driver audio.mic0"):
        assert cpu[part] > 0, part
    assert row["deadline_misses"] == sum(e["deadline_misses"] for e in row["engines"].values())
