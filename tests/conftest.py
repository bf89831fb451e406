import pytest

from tests.dist import RankPool


@pytest.fixture(scope="session")
def ranks2():
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def ranks4():
    pool = RankPool(4)
    yield pool
    pool.close()
