"""Fixtures shared by the recommender tests."""

import pytest
import torch

from mind.data import make_synthetic, prepare


@pytest.fixture
def one_thread():
    """Tiny models on a shared machine train fastest single-threaded."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny():
    """60 users, 80 items in 4 planted clusters, histories of 10: trains in about a second."""
    raw, _ = make_synthetic(num_users=60, num_items=80, num_clusters=4, seq_len=(10, 20), seed=1)
    return prepare(raw, max_len=10)
