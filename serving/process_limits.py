"""Process-wide settings `earlyexit-serve` applies at start: the open-file limit, and how the C
allocator hands memory back. Library code never calls these; only the server's CLI does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

logger = logging.getLogger(__name__)

# Descriptors kept for what is not a client connection: model files, the listening socket,
# onnxruntime and Python's own, log streams.
FD_RESERVE = 256
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter numbers
_MMAP_THRESHOLD_BYTES = 1024 * 1024


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Go and nginx do) and return it; each
    client connection holds one descriptor. Returns the unchanged limit where it cannot."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit above %d: %s", soft, exc)
    return soft


def connection_capacity(requested: int, open_file_limit: int) -> int:
    """The connection limit that leaves FD_RESERVE descriptors free, never above `requested`:
    a server out of descriptors cannot even accept the connection it would close."""
    capacity = max(8, open_file_limit - FD_RESERVE)
    if requested > capacity:
        logger.warning(
            "EARLYEXIT_MAX_CONNECTIONS=%d lowered to %d: the open-file limit is %d",
            requested,
            capacity,
            open_file_limit,
        )
    return min(requested, capacity)


def return_large_allocations() -> bool:
    """Make glibc serve every allocation of 1 MiB or more (decoded images, their conversions)
    from its own mmap, returned to the system when freed. By default glibc raises that
    threshold after the first large free (up to 32 MiB), and images freed from the heap and
    per-thread arenas keep the process hundreds of MiB above its idle size. No-op elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, the app, settings: tens of thousands, none of them
    garbage) out of the cyclic collector's reach. A full collection otherwise walks them all,
    which measured about 100 ms on a loaded 2-core host: a pause every request waits out."""
    gc.collect()
    gc.freeze()
