"""Integrations with training frameworks, one module each, imported on demand.

Importing this package imports nothing heavy. Each integration needs its framework,
installed through an optional extra:

* :mod:`moe_replay.integrations.trl`: routing replay in TRL's ``GRPOTrainer``
  (``pip install "moe_replay[trl]"``).
"""

from __future__ import annotations

__all__: list[str] = []
