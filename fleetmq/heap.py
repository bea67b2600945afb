"""Keeps a large registry out of the cyclic garbage collector's way.

A million nodes are several million long-lived objects that hold no reference cycles, yet
every full collection walks them all: during a mass expiry that made half of the CPU time
(measured: 7.0 s -> 4.7 s for 1,000,000 nodes going offline at once). Once the fleet has grown
enough, the heap is collected once and frozen (``gc.freeze``): what is alive then is left out
of later collections, and still freed by reference counting when it goes.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000
"""Tracked objects allocated (net) between two collections of the youngest generation:
Python's 700 ran the older generations' collections so often during a registration flood
(a few objects kept per node) that they took 11% of the manager's time registering 300,000
nodes (bench/README.md section 20). Each young collection walks more objects, about as many
in total; the older ones, which walk everything not frozen, run fourteen times less often."""
FREEZE_FROM = 100_000
"""Below this many nodes a full collection is cheap: nothing to do."""
FREEZE_GROWTH = 1.5
"""Freeze again once the fleet has grown by half since the last time (one pause of ~0.35 s
at 1,000,000 nodes, a handful of times while a fleet grows to that size)."""


class Heap:
    def __init__(self) -> None:
        self.frozen_at = 0

    @contextmanager
    def loading(self) -> Iterator[None]:
        """While a store loads (millions of new objects, no cycles among them) the collector
        pauses, it would walk them again and again (measured: it doubles the load time);
        what is alive afterwards is frozen."""
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            gc.enable()

    def space_collections(self) -> None:
        """Collect the youngest generation every ``YOUNG_THRESHOLD`` allocations."""
        gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    def frozen(self, nodes: int) -> None:
        """The heap was just frozen with this many nodes (after loading the store)."""
        self.frozen_at = nodes

    def settle(self, nodes: int) -> bool:
        """Collect and freeze if the fleet has grown enough; True if it did."""
        if nodes < FREEZE_FROM or nodes < self.frozen_at * FREEZE_GROWTH:
            return False
        gc.collect()
        gc.freeze()
        self.frozen_at = nodes
        log.info("heap_frozen nodes=%d", nodes)
        return True

    def thaw(self) -> None:
        """The fleet is let go (its service ended): what was frozen may be collected again
        (a manager started anew in the same process, as after a step-down, must not keep
        the last one's fleet forever)."""
        gc.unfreeze()
        self.frozen_at = 0
