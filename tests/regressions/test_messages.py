"""Issue 19 item 14: bad settings and models get errors that name the problem (they gave torch's own messages)."""

from __future__ import annotations

import pytest
from torch import nn

import mtlzoo
from mtlzoo.errors import InvalidModelError


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_a_preference_vector_that_is_not_numbers_is_named(name: str) -> None:
    with pytest.raises(ValueError, match=r"Parameter `pref_vector` should hold 2 finite non-negative numbers"):
        mtlzoo.create(name, num_tasks=2, pref_vector="x")


@pytest.mark.parametrize("heads", [[nn.Linear(2, 1), lambda z: z], {"a": nn.Linear(2, 1), "b": 3}])
def test_a_head_that_is_not_a_module_is_named_as_a_head(heads: object) -> None:
    named = r"Every head should be an nn\.Module.*heads (1 \(function\)|b \(int\))"
    with pytest.raises(InvalidModelError, match=named):
        mtlzoo.HardSharing(nn.Linear(2, 2), heads)  # type: ignore[arg-type]
