"""Region analysis: pure integer properties, checked over random stacks."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilec.analysis.regions import (Window, axis_regions, check_splits, even_splits, intersect, length,
                                    weighted_splits)


@st.composite
def window_stacks(draw):
    """A chain of 1-6 windows (conv k in 1,3,5 / pools 2/2, 2/1, 3/2) on an odd-or-even axis."""
    n = draw(st.integers(1, 40))
    windows = []
    for _ in range(draw(st.integers(1, 6))):
        size, stride = draw(st.sampled_from([(1, 1), (1, 2), (3, 1), (3, 2), (5, 1), (5, 2), (2, 2), (2, 1), (3, 2)]))
        lo = draw(st.integers(0, size - 1))
        hi = draw(st.integers(0, size - 1))
        out = (n + lo + hi - size) // stride + 1
        if out < 1:
            break
        windows.append(Window(size, stride, lo, n, out))
        n = out
    if not windows:
        windows = [Window(1, 1, 0, n, n)]
    return windows


@st.composite
def stack_and_splits(draw):
    windows = draw(window_stacks())
    n = windows[-1].n_out
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=min(5, n - 1))) if n > 1 else set()
    return windows, [0, *sorted(cuts), n]


@settings(max_examples=300, deadline=None)
@given(stack_and_splits())
def test_regions_cover_need_and_owned_partitions(case):
    windows, splits = case
    layers, inputs = axis_regions(windows, splits)
    for j, w in enumerate(windows):
        owned = [layers[t][j].owned for t in range(len(layers))]
        # owned ranges partition the whole map, in tile order
        assert owned[0][0] == 0 and owned[-1][1] == w.n_out - 1
        for a, b in zip(owned, owned[1:]):
            assert b[0] == a[1] + 1
        for t in range(len(layers)):
            al = layers[t][j]
            lo, hi = al.owned
            if lo <= hi:
                assert al.region[0] <= lo and hi <= al.region[1]
            # the input read is what the region needs, clipped, plus border padding
            need = w.need(*al.region)
            assert al.src == (max(need[0], 0), min(need[1], w.n_in - 1))
            assert al.pads == (al.src[0] - need[0], need[1] - al.src[1])
            assert (length(al.src) + sum(al.pads) - w.size) // w.stride + 1 == length(al.region)
            # every layer but the first reads inside the previous layer's region
            if j > 0:
                prev = layers[t][j - 1].region
                assert prev[0] <= al.src[0] and al.src[1] <= prev[1]
            else:
                assert inputs[t] == al.src
    # the last layer's regions are exactly the tiles
    assert [layers[t][-1].region for t in range(len(layers))] == [(a, b - 1) for a, b in zip(splits, splits[1:])]


def test_rows_that_feed_no_output_are_still_covered():
    # a stride-2 1x1 conv reads only even rows; odd rows still need an owner
    w = Window(1, 2, 0, 9, 5)
    layers, _ = axis_regions([Window(3, 1, 1, 9, 9), w], [0, 2, 5])
    assert [layers[t][0].region for t in range(2)] == [(0, 3), (4, 8)]
    assert [layers[t][0].owned for t in range(2)] == [(0, 3), (4, 8)]


def test_halo_grows_with_depth():
    ws = [Window(3, 1, 1, 32, 32)] * 4
    layers, inputs = axis_regions(ws, [0, 16, 32])
    assert [layers[0][j].region for j in range(4)] == [(0, 18), (0, 17), (0, 16), (0, 15)]
    assert inputs == [(0, 19), (12, 31)]


@pytest.mark.parametrize("splits", [[0, 5], [1, 5, 10], [0, 3, 3, 10], [0, 11], [0, 4, 2, 10]])
def test_bad_splits_are_rejected(splits):
    with pytest.raises(ValueError):
        check_splits(splits, 10)


@given(st.integers(1, 500), st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_weighted_splits_are_valid_and_proportional(n, weights):
    if len(weights) > n:
        weights = weights[:n]
    s = weighted_splits(n, weights)
    check_splits(s, n)
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs((s[i + 1] - s[i]) - n * w / total) <= len(weights) + 1


def test_even_splits_and_intersect():
    assert even_splits(13, 2) == [0, 6, 13] or even_splits(13, 2) == [0, 7, 13]
    assert intersect((0, 5), (3, 9)) == (3, 5)
    assert intersect((0, 2), (3, 9)) is None
