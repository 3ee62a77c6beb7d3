import pytest
import torch

THREADS = 2


@pytest.fixture(autouse=True)
def _fixed_threads():
    """CPU timings are taken with a fixed, stated thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)
