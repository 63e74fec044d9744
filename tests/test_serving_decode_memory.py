"""`serving.imaging.plan_decode` must cover what decoding really holds: each case decodes one
image in a fresh process and compares the process's peak resident memory with the estimate the
decode budget reserves for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: peak RSS is reset (Linux clear_refs) after the image is built.
_PROBE = r"""
import io, json, sys
import numpy as np
from PIL import Image
from core.bundle import InputSpec
from serving.imaging import decode_image, open_image, plan_decode

mode, side, target, fmt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
if mode == "I;16":
    image = Image.fromarray(rng.integers(0, 65535, (side, side), dtype=np.uint16))
elif mode == "P":
    image = Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8), "L").convert("P")
else:
    bands = len(Image.new(mode, (1, 1)).getbands())
    image = Image.fromarray(rng.integers(0, 255, (side, side, bands), dtype=np.uint8), mode)
buf = io.BytesIO()
options = {"PNG": {"compress_level": 1}, "WEBP": {"lossless": True, "method": 0}}[fmt]
if mode == "P":
    options["transparency"] = 0
image.save(buf, fmt, **options)
data = buf.getvalue()
del image

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

spec = InputSpec(shape=(3, target, target), mean=(0.5,) * 3, std=(0.25,) * 3)
opened = open_image(data, 1 << 40)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
estimate = plan_decode(opened, spec)
decode_image(opened, spec)
print(json.dumps({"peak": status("VmHWM") - base, "estimate": estimate}))
"""


def _clear_refs_works() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _clear_refs_works(), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize(
    ("mode", "side", "target", "fmt"),
    [
        ("P", 2048, 32, "PNG"),  # shrunk: palette → RGBA → premultiplied
        ("I;16", 2048, 32, "PNG"),  # shrunk: 16-bit → 32-bit
        ("RGBA", 2048, 32, "WEBP"),  # libwebp's own buffers
        ("RGBA", 1024, 224, "PNG"),  # full size: compositing on white
        ("P", 1024, 224, "PNG"),
        ("I;16", 1024, 224, "PNG"),  # full size: 16-bit → 8-bit in float32
    ],
)
def test_the_estimate_covers_the_measured_peak(mode: str, side: int, target: int, fmt: str):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(side), str(target), fmt],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["peak"] > 0
    # Page-granular accounting and allocator slack: the estimate may not be exceeded by more
    # than a few percent (it is meant to be above, with margin).
    assert result["peak"] <= result["estimate"] * 1.05, result
