"""The heap is frozen once the fleet is large, and again only after it grew by half."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from fleetmq.heap import FREEZE_FROM, YOUNG_THRESHOLD, Heap


@pytest.fixture
def heap() -> Iterator[Heap]:
    gc.unfreeze()  # a manager started earlier in this process may have frozen its heap
    yield Heap()
    gc.unfreeze()


def test_a_small_fleet_is_left_alone(heap: Heap) -> None:
    assert not heap.settle(FREEZE_FROM - 1)
    assert gc.get_freeze_count() == 0


def test_a_large_fleet_is_frozen_once_then_after_growing_by_half(heap: Heap) -> None:
    assert heap.settle(FREEZE_FROM)
    assert gc.get_freeze_count() > 0
    assert not heap.settle(FREEZE_FROM + FREEZE_FROM // 4)
    assert heap.settle(FREEZE_FROM * 3 // 2)


def test_a_fleet_loaded_and_frozen_at_start_is_not_frozen_again_at_once(heap: Heap) -> None:
    heap.frozen(1_000_000)
    assert not heap.settle(1_200_000)
    assert heap.settle(1_500_000)


def test_young_collections_are_spaced_out(heap: Heap) -> None:
    before = gc.get_threshold()
    try:
        heap.space_collections()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)
