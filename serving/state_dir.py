"""Where the server keeps what it writes when the bundle it was given must stay untouched.

The default bundle ships inside the installed package. Serving it in place would make
`PUT /v1/thresholds` rewrite a file of the installation (and fail for a read-only one). It is
therefore served from a copy under the state directory: `EARLYEXIT_STATE_DIR`, or
`$XDG_STATE_HOME/earlyexit`, or `~/.local/state/earlyexit`. The copy is named after the
manifest's sha256, so an upgraded package gets a fresh copy while admin updates to the same
model survive restarts. Any other bundle is served where it is: it belongs to its user.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from core.bundle import MANIFEST_FILE, BundleError, load_manifest
from serving.settings import DEFAULT_BUNDLE_DIR

logger = logging.getLogger(__name__)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "earlyexit"


def is_packaged_default(bundle: Path) -> bool:
    try:
        return bundle.resolve() == DEFAULT_BUNDLE_DIR.resolve()
    except OSError:
        return False


def writable_copy(bundle: Path, state_dir: Path | None) -> Path:
    """The copy of `bundle` to serve from under the state directory, made on first use (and
    checked like any bundle). OSError when the state directory cannot be written."""
    manifest_sha = hashlib.sha256((bundle / MANIFEST_FILE).read_bytes()).hexdigest()[:16]
    root = (state_dir or default_state_dir()) / "bundles"
    target = root / f"default-{manifest_sha}"
    if target.is_dir():
        try:
            load_manifest(target, verify=True)
            return target
        except BundleError as exc:  # a damaged copy is replaced, never served
            logger.warning("replacing damaged bundle copy %s: %s", target, exc)
            shutil.rmtree(target, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    # Copied beside the target and renamed: a crash never leaves a half copy under its name.
    staging = Path(tempfile.mkdtemp(prefix=".default-", dir=root))
    try:
        shutil.copytree(bundle, staging / "bundle")
        try:
            os.replace(staging / "bundle", target)
        except OSError:
            if not (target / MANIFEST_FILE).is_file():
                raise
            # Another server starting from the same state directory made the copy first.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("serving the packaged default bundle from a writable copy at %s", target)
    return target


def serving_dir(bundle: Path, state_dir: Path | None) -> tuple[Path, str | None]:
    """(directory to serve from, why its thresholds cannot be persisted or None)."""
    if not is_packaged_default(bundle):
        return bundle, None
    try:
        return writable_copy(bundle, state_dir), None
    except OSError as exc:
        reason = (
            f"the packaged default bundle is served read-only: cannot copy it to the state "
            f"directory ({exc}); set EARLYEXIT_STATE_DIR to a writable directory"
        )
        logger.warning(reason)
        return bundle, reason
