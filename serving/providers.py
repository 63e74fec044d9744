"""Execution provider names: the short names users type (`cpu`, `cuda`, or "cuda,cpu") mapped
to onnxruntime's, shared by the settings, the runtime and every CLI so all of them accept and
refuse the same spellings. No onnxruntime import: settings are validated before it loads."""

from __future__ import annotations

from typing import Any

# The runtime supports these two; CUDA falls back to CPU unless strict.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}


def normalize_providers(value: Any) -> list[str]:
    """Accept "cuda,cpu", ["cuda", "cpu"] or full ORT names; return ORT provider names in
    order, without repeats (empty for None or an empty list). Unknown names → ValueError."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    known = {v.lower(): v for v in PROVIDER_ALIASES.values()}
    out: list[str] = []
    for item in items:
        name = str(item).strip()
        if not name:
            continue
        key = name.lower()
        resolved = PROVIDER_ALIASES.get(key) or known.get(key)
        if resolved is None:
            raise ValueError(
                f"unknown execution provider {name!r} "
                f'(use {", ".join(sorted(PROVIDER_ALIASES))}, e.g. "cuda,cpu")'
            )
        if resolved not in out:
            out.append(resolved)
    return out
