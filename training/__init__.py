"""Training of multi-exit self-distilled networks (seed 004).

`create_model` / `list_models` are resolved lazily so `import training` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_model", "list_models", "create_backbone"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
