"""Argument checks shared by the modules: a value is refused, never truncated or wrapped."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["is_integer"]


def is_integer(value: Any) -> bool:
    """A Python or numpy integer, or a 0-d integer tensor; never a bool, a float (2.0 included) or a string."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return True
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool)
    )
