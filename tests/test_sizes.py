"""Size arithmetic: legal sizes, output sizes, skip crops, for the paper's depth and others."""

import pytest
from hypothesis import given, strategies as st

from unet_cuda import sizes


def test_paper_tile():
    plan = sizes.plan(572, 5)
    assert plan.output_size == 388
    assert plan.skip_sizes == (568, 280, 136, 64)
    assert plan.bottleneck_size == 28
    assert plan.up_sizes == (392, 200, 104, 56)
    assert plan.crops == (88, 40, 16, 4)
    assert sizes.context_border(5) == 92


def test_paper_formula_input_16b_plus_124():
    # PAPER.md: input = 16 b + 124, output = 16 b - 60, b the bottleneck size
    for b in range(4, 60):
        n = 16 * b + 124
        assert sizes.is_legal_input_size(n, 5)
        assert sizes.plan(n, 5).bottleneck_size == b
        assert sizes.output_size(n, 5) == 16 * b - 60


def test_illegal_size_names_nearest_legal_sizes():
    with pytest.raises(sizes.IllegalSizeError, match=r"570 is illegal.*odd size.*556 or 572"):
        sizes.output_size(570, 5)
    with pytest.raises(sizes.IllegalSizeError, match=r"Nearest legal input sizes: 188"):
        sizes.output_size(20, 5)


def test_nearest_legal_sizes_are_legal_and_adjacent():
    below, above = sizes.nearest_legal_input_sizes(600, 5)
    assert (below, above) == (588, 604)
    assert sizes.nearest_legal_input_sizes(572, 5) == (572, 572)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_legal_sizes_form_progression(depth):
    legal = sizes.legal_input_sizes(depth, 800)
    assert legal, depth
    steps = {b - a for a, b in zip(legal, legal[1:])}
    assert steps == {2 ** (depth - 1)} or len(legal) == 1
    # output = input - 2 * context border for every legal size
    border = sizes.context_border(depth)
    for n in legal[:20]:
        assert sizes.output_size(n, depth) == n - 2 * border


@given(n=st.integers(1, 3000), depth=st.integers(1, 7))
def test_legality_matches_layer_arithmetic(n, depth):
    # Independent re-derivation: walk the layers, every pool input even and every map non-empty.
    s, legal = n, True
    for _ in range(depth - 1):
        s -= 4
        if s < 2 or s % 2:
            legal = False
            break
        s //= 2
    if legal:
        s -= 4
        for _ in range(depth - 1):
            if s < 1:
                break
            s = 2 * s - 4
        legal = s >= 1
    assert sizes.is_legal_input_size(n, depth) == legal


@given(n=st.integers(1, 3000), depth=st.integers(1, 6))
def test_nearest_sizes_bracket_n(n, depth):
    below, above = sizes.nearest_legal_input_sizes(n, depth)
    assert sizes.is_legal_input_size(above, depth) and above >= n
    if below is None:  # n is below the smallest legal size, which is then `above`
        assert all(not sizes.is_legal_input_size(m, depth) for m in range(1, above))
    else:
        assert above - n < 2 ** (depth - 1)
        assert sizes.is_legal_input_size(below, depth) and below <= n
        assert all(not sizes.is_legal_input_size(m, depth) for m in range(below + 1, above))


@given(m=st.integers(1, 2000), depth=st.integers(1, 6))
def test_input_size_for_output(m, depth):
    n = sizes.input_size_for_output(m, depth)
    assert sizes.output_size(n, depth) >= m
    smaller = n - 2 ** (depth - 1)
    if sizes.is_legal_input_size(smaller, depth):
        assert sizes.output_size(smaller, depth) < m


def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        sizes.plan(572, 0)
