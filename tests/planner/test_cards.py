"""planner.cards: budgets by card name or size."""

import pytest

from snugtune.errors import ConfigError
from snugtune.planner.cards import GIB, budget_bytes


def test_budget_names_and_sizes():
    assert budget_bytes("t4")[:2] == (int(15 * GIB), False)
    assert budget_bytes("10GiB")[0] == 10 * GIB and budget_bytes("24gb")[0] == 24 * GIB
    with pytest.raises(ConfigError, match="neither a card"):
        budget_bytes("t5")


