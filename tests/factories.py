"""Factories that tests load through ``python:tests.factories:NAME`` sources."""

import torch


def mlp(hidden: int = 16):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


class NotATensor:
    """An arbitrary object: a state dict holding it must be refused, not unpickled."""
