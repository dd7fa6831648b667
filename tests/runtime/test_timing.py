"""runtime/timing.py: interleaved medians time each call in turn, and paired mode precedes each
timed call with an untimed call of the same callable (so another engine's spinning threads
never overlap a timed call)."""

import time

from effc.runtime.timing import interleaved_medians


def test_interleaved_medians_order_and_pairing():
    log = []

    def make(name, seconds):
        def call():
            log.append(name)
            time.sleep(seconds)

        return call

    fast, slow = make("a", 0.001), make("b", 0.004)
    ms = interleaved_medians([fast, slow], trials=3)
    assert log == ["a", "b"] + ["a", "b"] * 3  # warm-up, then interleaved
    assert 0.9 < ms[0] < ms[1] and ms[1] > 3.5
    log.clear()
    interleaved_medians([fast, slow], trials=3, paired=True)
    assert log == ["a", "b"] + ["a", "a", "b", "b"] * 3
    log.clear()  # blocks: each turn an untimed call, then `block` timed ones back to back
    ms = interleaved_medians([fast, slow], trials=4, paired=True, block=2)
    assert log == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2
    assert ms[0] < ms[1]
