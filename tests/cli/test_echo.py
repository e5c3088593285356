"""`fusion-node echo`: a wrong topic names the topics that are there; predictions show their
values without --json."""

import threading
import time

import numpy as np
import zmq

from fusion_node.cli import main
from fusion_node.protocol import Health, Prediction
from fusion_node.transport import Publisher


def publishing(endpoint: str, messages: list, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        context = zmq.Context()
        publisher = Publisher(context, endpoint)
        seq = 0
        while not stop.is_set():
            for msg in messages:
                msg.seq = seq
                publisher.send(msg)
            seq += 1
            time.sleep(0.02)
        publisher.close()
        context.term()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_topic_nobody_publishes_names_the_topics_seen(tmp_path, capsys):
    endpoint = f"ipc://{tmp_path}/node.ipc"
    stop = threading.Event()
    thread = publishing(endpoint, [Health("node.health", 0, 1, {"ok": True})], stop)
    try:
        assert main(["echo", "pred.speach", "--endpoint", endpoint, "--timeout", "1"]) == 1
    finally:
        stop.set()
        thread.join()
    assert capsys.readouterr().err.strip() == (
        f"fusion-node: error: no message on 'pred.speach' from {endpoint} within 1.0 s; "
        "topics seen there: node.health")


def test_nothing_published_at_all_says_so(tmp_path, capsys):
    endpoint = f"ipc://{tmp_path}/nobody.ipc"
    assert main(["echo", "pred.", "--endpoint", endpoint, "--timeout", "0.5"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "nothing was published there (is the node running?)")


def test_a_prediction_shows_its_values(tmp_path, capsys):
    endpoint = f"ipc://{tmp_path}/node.ipc"
    prediction = Prediction("pred.speech", 0, 10, 50, "speech", "h", {"audio.mic0": True},
                            {"command": "red", "voice_active": True}, {
                                "vad": np.zeros(3, np.float32)}, {})
    stop = threading.Event()
    thread = publishing(endpoint, [Health("node.health", 0, 1, {}), prediction], stop)
    try:
        assert main(["echo", "pred.speech", "--endpoint", endpoint, "--count", "1"]) == 0
    finally:
        stop.set()
        thread.join()
    line = capsys.readouterr().out.strip()
    assert line.startswith("type=prediction stream=pred.speech")
    assert "command=red" in line and "voice_active=True" in line
