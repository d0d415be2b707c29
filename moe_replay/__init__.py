"""moe_replay: find the routers of any PyTorch MoE, record their expert choices, replay them.

Example:
    >>> import torch, moe_replay as mr
    >>> model = mr.models.build("softmax_topk")
    >>> x = torch.randint(0, model.config.vocab_size, (2, 8))
    >>> session = mr.attach(model)
    >>> with session.capture():
    ...     _ = model(x)
    >>> routes = session.routes()
    >>> routes.indices.shape          # [tokens, routers, k]
    torch.Size([16, 2, 2])
    >>> with session.replay(routes):
    ...     model(x, labels=x).loss.backward()
    >>> session.detach()
"""

from __future__ import annotations

from . import distributed, interop, models
from .batch import BatchLayout, pack_routes, pad_routes
from .discovery import Adapter, RouterSite, find_routers, format_sites
from .errors import (
    ArgumentTypeError,
    CaptureOverflowError,
    InvalidArgumentError,
    LayerMapError,
    MissingDependencyError,
    MissingFileError,
    MoEReplayError,
    NotAFileError,
    ReplayConsumptionError,
    RouterNotFoundError,
    RoutesValidationError,
    SessionStateError,
    TokenIndexError,
    TokenMismatchError,
    UnknownRouterError,
    UnsupportedRouterError,
    _check_calls,
)
from .generation import generation_capacity, generation_lengths, split_generation
from .interop import LayerMap
from .losses import RouterScores, load_balancing_loss
from .metrics import RoutingComparison, compare
from .ring import index_dtype
from .routes import Routes
from .session import DEFAULT_CAPACITY, Session, attach

#: The version of moe_replay; the one place it is written (pyproject.toml reads it from here).
__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CAPACITY",
    "Adapter",
    "ArgumentTypeError",
    "BatchLayout",
    "CaptureOverflowError",
    "InvalidArgumentError",
    "LayerMap",
    "LayerMapError",
    "MissingDependencyError",
    "MissingFileError",
    "MoEReplayError",
    "NotAFileError",
    "ReplayConsumptionError",
    "RouterNotFoundError",
    "RouterScores",
    "RouterSite",
    "Routes",
    "RoutesValidationError",
    "RoutingComparison",
    "Session",
    "SessionStateError",
    "TokenIndexError",
    "TokenMismatchError",
    "UnknownRouterError",
    "UnsupportedRouterError",
    "__version__",
    "attach",
    "compare",
    "distributed",
    "find_routers",
    "format_sites",
    "generation_capacity",
    "generation_lengths",
    "index_dtype",
    "interop",
    "load_balancing_loss",
    "models",
    "pack_routes",
    "pad_routes",
    "split_generation",
]

# A call that does not bind to an entry point's signature (a misspelled keyword...) raises an ArgumentTypeError that
# names the closest valid name and the parameters, where Python's own TypeError says none of what to do.
_check_calls(__name__, methods=True)
for _module in (distributed, interop, models):
    _check_calls(_module.__name__)
del _module
