"""Factories that tests load through ``python:tests.factories:NAME`` sources."""

import torch


def mlp(hidden: int = 16):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


class NotATensor:
    """An arbitrary object: a state dict holding it must be refused, not unpickled."""


def codenet_micro(variant: str = "dcn_dw_square_int"):
    """A CoDeNet small enough to train, lower and C-simulate in seconds."""
    from edgekit.models.codenet import CoDeNet

    return CoDeNet(3, variant, widths=(8, 16, 32, 64), repeats=(1, 1, 1), decoder_channels=(32, 16, 16), head_channels=8, skips=True)
