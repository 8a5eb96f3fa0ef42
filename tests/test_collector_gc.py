"""The collector's garbage-collector tuning (collector.pipeline.tune_gc): cheaper scans, and
reference cycles still freed. Run in a child process: freezing objects would outlive the test."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from collector.pipeline import GC_YOUNG_THRESHOLD

_CHILD = textwrap.dedent("""
    import gc, weakref
    from collector.pipeline import tune_gc

    class Node:
        pass

    before = gc.get_threshold()
    tune_gc()
    after = gc.get_threshold()
    print(after[0], after[1:] == before[1:], gc.get_freeze_count() > 0)

    # A cycle made after tuning is still collected once enough allocations follow it.
    a, b = Node(), Node()
    a.other, b.other = b, a
    freed = []
    weakref.finalize(a, freed.append, True)
    del a, b
    keep = [[] for _ in range(3 * %d)]
    print(bool(freed))
""")


def test_tune_gc_raises_the_young_threshold_freezes_and_still_frees_cycles():
    out = subprocess.run([sys.executable, "-c", _CHILD % GC_YOUNG_THRESHOLD],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(GC_YOUNG_THRESHOLD), "True", "True", "True"]
