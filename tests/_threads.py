"""Run a block at a given torch thread count and restore the previous count afterwards, also on failure."""
import contextlib

import torch


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
