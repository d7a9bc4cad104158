"""ALiBi slopes against the formula of Press et al. written out independently here."""

import math

import numpy as np
import pytest

from pallas_kernels import alibi_slopes, alibi_slopes_np


def press_slopes(n):
    """The recursive construction from the ALiBi paper's reference code."""
    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + press_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 8, 9, 12, 20, 24, 32, 40, 64])
def test_slopes_equal_formula(n):
    np.testing.assert_allclose(alibi_slopes_np(n), press_slopes(n), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(alibi_slopes(n)), press_slopes(n), rtol=1e-6)


def test_known_values():
    # 8 heads: 1/2, 1/4, ..., 1/256 exactly.
    np.testing.assert_array_equal(alibi_slopes_np(8), [2.0**-k for k in range(1, 9)])
    # 12 heads: the 8-head slopes then odd powers of 2^-0.5.
    np.testing.assert_allclose(alibi_slopes_np(12)[8:], [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "8"])
def test_bad_head_count(bad):
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        alibi_slopes_np(bad)
