"""Pools of local gloo ranks, started once per world size for the whole runtime test session."""

import pytest

from autopar.testing import RankPool


@pytest.fixture(scope="session")
def pools():
    started: dict[int, RankPool] = {}

    def get(world: int) -> RankPool:
        if world not in started:
            started[world] = RankPool(world)
        return started[world]

    yield get
    for pool in started.values():
        pool.close()
