"""What remains of the host-path checks once the surgery methods' duplicate paths were removed (issue 18): the
finiteness check of :mod:`mtlzoo.linalg`. The solvers' LAPACK calls are checked in tests/test_solvers.py, the
surgery methods' reference values in tests/strategies/test_values.py.
"""

from __future__ import annotations

import torch


def test_linalg_all_finite_is_exact_where_its_sum_is_not() -> None:
    """The sum-based check: finite entries whose sum overflows are finite; inf, -inf and NaN are not."""
    from mtlzoo.linalg import all_finite
    huge = torch.full((4,), 3e38)
    assert all_finite(huge) and all_finite(torch.zeros(0))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), 1.0]))
