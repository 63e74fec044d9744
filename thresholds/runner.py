"""How tuning opens the serving runtime (collecting calibration, timing latency)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RuntimeOptions:
    providers: tuple[str, ...] | None = None  # None = the runtime's default (CPU)
    intra_op_threads: int = 0  # 0 = onnxruntime's default

    def open(self, bundle_dir: str | os.PathLike[str], plain: bool = False) -> Any:
        """An `EarlyExitRuntime` on the bundle, or with `plain` a `PlainModelRuntime` on its
        plain model (imported here: onnxruntime is heavy)."""
        kwargs: dict[str, Any] = {"intra_op_threads": self.intra_op_threads}
        if self.providers is not None:
            kwargs["providers"] = list(self.providers)
        if plain:
            from serving.plain_runtime import PlainModelRuntime

            return PlainModelRuntime(bundle_dir, **kwargs)
        from serving.runtime import EarlyExitRuntime

        return EarlyExitRuntime(bundle_dir, **kwargs)
