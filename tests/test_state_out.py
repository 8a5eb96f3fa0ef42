"""The normalized state goes out at most once per interval per device, always ending at the
newest state, in order."""

from __future__ import annotations

import threading
import time

from collector.state_out import StateOut


class Sent:
    def __init__(self):
        self.items: list[tuple[float, tuple[str, int]]] = []
        self.lock = threading.Lock()

    def __call__(self, item):
        with self.lock:
            self.items.append((time.monotonic(), item))

    def of(self, device):
        with self.lock:
            return [(t, n) for t, (d, n) in self.items if d == device]


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_a_burst_is_folded_into_the_first_and_the_newest_state():
    sent = Sent()
    out = StateOut(sent, min_interval=0.3).start()
    try:
        for n in range(500):
            out.offer("A", ("A", n))
        assert _wait(lambda: sent.of("A") and sent.of("A")[-1][1] == 499)
        time.sleep(0.4)
        got = sent.of("A")
        # One publish when the thread first ran (whichever state was newest then), and the
        # newest once the interval was over; a thread that only ran after the burst sends one.
        assert len(got) in (1, 2) and got[-1][1] == 499
        if len(got) == 2:
            assert got[1][0] - got[0][0] >= 0.29  # the newest waited for the interval
    finally:
        out.stop()


def test_a_quiet_device_publishes_at_once():
    sent = Sent()
    out = StateOut(sent, min_interval=0.2).start()
    try:
        out.offer("A", ("A", 1))
        assert _wait(lambda: len(sent.of("A")) == 1, timeout=0.15)
        time.sleep(0.25)
        t0 = time.monotonic()
        out.offer("A", ("A", 2))
        assert _wait(lambda: len(sent.of("A")) == 2, timeout=0.15)
        assert sent.of("A")[1][0] - t0 < 0.1
    finally:
        out.stop()


def test_devices_are_throttled_each_on_its_own():
    sent = Sent()
    out = StateOut(sent, min_interval=0.3).start()
    try:
        out.offer("A", ("A", 1))
        assert _wait(lambda: len(sent.of("A")) == 1)
        out.offer("A", ("A", 2))  # waits for A's interval
        out.offer("B", ("B", 1))  # B has published nothing: goes at once
        assert _wait(lambda: len(sent.of("B")) == 1, timeout=0.15)
        assert [n for _, n in sent.of("A")] == [1]
        assert _wait(lambda: [n for _, n in sent.of("A")] == [1, 2])
    finally:
        out.stop()


def test_stop_publishes_what_is_pending():
    sent = Sent()
    out = StateOut(sent, min_interval=60).start()
    out.offer("A", ("A", 1))
    assert _wait(lambda: len(sent.of("A")) == 1)
    out.offer("A", ("A", 2))
    out.offer("A", ("A", 3))
    out.stop()
    assert [n for _, n in sent.of("A")] == [1, 3]


def test_zero_interval_publishes_every_item_it_can():
    sent = Sent()
    out = StateOut(sent, min_interval=0).start()
    try:
        for n in range(5):
            out.offer("A", ("A", n))
            assert _wait(lambda n=n: len(sent.of("A")) == n + 1)
    finally:
        out.stop()


def test_a_failing_send_does_not_stop_the_thread():
    calls = []

    def send(item):
        calls.append(item)
        if item == ("A", 1):
            raise RuntimeError("broker gone")

    out = StateOut(send, min_interval=0).start()
    try:
        out.offer("A", ("A", 1))
        assert _wait(lambda: len(calls) == 1)
        out.offer("A", ("A", 2))
        assert _wait(lambda: calls == [("A", 1), ("A", 2)])
        assert out.published == 1
    finally:
        out.stop()
