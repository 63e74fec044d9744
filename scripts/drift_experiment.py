"""Drift experiment (issue #20 item 4): stale thresholds on shifted traffic, the drift signal,
and a guarded live retune, measured against a real `earlyexit-serve` over HTTP.

Phases, all through one server started on a temporary copy of the bundle (a temporary state
directory: nothing in the repository is written), shadow sampling at 100 %:

1. ``clean``: the first N CIFAR-10 test images, offline-tuned thresholds; the drift statistic
   compares them with the reference those thresholds carry (exit-1 confidence quantiles on the
   split they were tuned on).
2. ``POST /v1/thresholds/retune`` on the clean window: from then on the drift statistic is
   measured against that live window.
3. ``shifted``: the SAME N images corrupted (default Gaussian noise, severity 3).
4. ``POST /v1/thresholds/retune`` on the shifted window.
5. ``shifted_heldout``: M further test images (never in a retune sample), same corruption.

Per request the script keeps the server's answer and exit; the shadow rows (every exit's
probabilities, in answer order; concurrency 1) give the full-depth answer of the same request,
so agreement with full depth is measured per request, and the offline thresholds are also
replayed on every row (`core.decision.decide`) to show what they would have done on the same
traffic. Every `window` requests the script reads `GET /v1/shadow` (drift, estimated drop).
Each phase's rows are also compared with the offline reference directly
(`drift_vs_offline_reference`): what a server that never retuned would report.

    python scripts/drift_experiment.py --data-dir DATA --out docs/results/online_retune
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.atomic import atomic_write_json  # noqa: E402
from core.costs import acceleration, exit_fractions  # noqa: E402
from core.datasets import read_cifar10  # noqa: E402
from core.decision import decide  # noqa: E402
from core.drift import (  # noqa: E402
    QuantileReference,
    exit1_confidence,
    ks_against_quantiles,
    read_reference,
)
from core.plots import pyplot, save_png  # noqa: E402
from serving.shadow import agreement_signals, drop_alert  # noqa: E402
from serving.shadow_store import ShadowRows  # noqa: E402

TOKEN = "drift-experiment-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# ----------------------------------------------------------------------------- corruptions
# Severities 1-3 follow the first three levels of CIFAR-10-C (Hendrycks & Dietterich, 2019)
# in spirit; the implementations are small numpy versions, not theirs.
NOISE_SIGMA = (0.04, 0.06, 0.08)  # of the [0, 1] range
BLUR_SIGMA = (0.5, 0.8, 1.1)  # pixels
CONTRAST_FACTOR = (0.6, 0.4, 0.3)  # kept fraction of the distance to the image mean


def _as_float(images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise (σ per severity, fixed seed) on uint8 ...×H×W×C images."""
    sigma = NOISE_SIGMA[severity - 1]
    rng = np.random.default_rng(seed)
    return _to_uint8(_as_float(images) + rng.normal(0.0, sigma, size=images.shape))


def _gauss_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Separable Gaussian blur over H and W (reflect padding) of uint8 ...×H×W×C images."""
    del seed  # deterministic without randomness
    x = _as_float(images)
    kernel = _gauss_kernel(BLUR_SIGMA[severity - 1])
    r = kernel.size // 2
    h_axis, w_axis = x.ndim - 3, x.ndim - 2
    for axis in (h_axis, w_axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        padded = np.pad(x, pad, mode="reflect")
        out = np.zeros_like(x)
        n = x.shape[axis]
        for i, w in enumerate(kernel):
            out += w * np.take(padded, np.arange(i, i + n), axis=axis)
        x = out
    return _to_uint8(x)


def low_contrast(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Pull every pixel toward its image's mean (per image, over H, W and C)."""
    del seed
    x = _as_float(images)
    mean = x.mean(axis=(-3, -2, -1), keepdims=True)
    return _to_uint8((x - mean) * CONTRAST_FACTOR[severity - 1] + mean)


CORRUPTIONS = {"gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur,
               "low_contrast": low_contrast}  # fmt: skip


# ----------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def start_server(bundle: Path, work: Path, window: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EARLYEXIT_")}
    env.update({
        "EARLYEXIT_STATE_DIR": str(work / "state"),
        "EARLYEXIT_SHADOW_RATE": "1",
        "EARLYEXIT_SHADOW_QUEUE_SIZE": "8192",
        "EARLYEXIT_SHADOW_WINDOW": str(window),
        "EARLYEXIT_ADMIN_TOKEN": TOKEN,
    })  # fmt: skip
    exe = shutil.which("earlyexit-serve") or str(Path(sys.executable).parent / "earlyexit-serve")
    cmd = [exe, "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port),
           "--providers", "cpu", "--intra-op-threads", "1"]  # fmt: skip
    log = open(work / "server.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(client: Any, proc: subprocess.Popen[bytes], seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"earlyexit-serve exited with {proc.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.25)
    raise RuntimeError("earlyexit-serve not ready in time")


def stale_alert(
    probs: np.ndarray,
    thresholds: list[float],
    fallback: str,
    reference: QuantileReference | None,
    budget: float,
    confidence: float,
) -> dict[str, Any]:
    """What the server's drop alert would read on these rows had it kept the offline
    thresholds (the same signals code, the level from thresholds.json's recorded agreement)."""
    rows = ShadowRows(np.zeros(len(probs)), np.zeros(len(probs), dtype=np.int64), probs)
    live = agreement_signals(rows, thresholds, fallback, confidence)
    alert = drop_alert(live, thresholds, reference, budget)
    return {
        "rows": len(probs),
        "estimated_drop": live["estimated_drop"],
        "estimated_drop_lower": live["estimated_drop_lower"],
        "alert_level": alert["alert_level"],
        "over_budget": alert["over_budget"],
    }


def wait_drained(client: Any, rows: int, seconds: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        signals: dict[str, Any] = client.get("/v1/shadow").json()
        done = signals["rows"] >= rows or signals.get("dropped", 0) > 0
        if (done and signals.get("queue_depth", 0) == 0) or time.monotonic() > deadline:
            return signals
        time.sleep(0.1)


# ----------------------------------------------------------------------------- experiment


def stream(
    client: Any, phase: str, images: np.ndarray, labels: np.ndarray, window: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """POST every image (concurrency 1); read /v1/shadow after every `window` requests."""
    answers, signals = [], []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        r = client.post("/classify", content=png_bytes(image),
                        headers={"Content-Type": "image/png"})  # fmt: skip
        r.raise_for_status()
        body = r.json()
        exit_ = 0 if body["exit"] == "fallback" else int(body["exit"])
        answers.append({"phase": phase, "label": int(label), "answer": int(body["class_index"]),
                        "exit": exit_})  # fmt: skip
        if (i + 1) % window == 0:
            s = client.get("/v1/shadow").json()
            signals.append({"phase": phase, "requests": i + 1, "time": time.time(),
                            "rows": s["rows"], "agreement": s["live"]["agreement"],
                            "estimated_drop": s["live"]["estimated_drop"],
                            "estimated_drop_lower": s["live"]["estimated_drop_lower"],
                            "estimated_drop_upper": s["live"]["estimated_drop_upper"],
                            "tuned_drop": s.get("tuned_drop"),
                            "alert_level": s.get("alert_level"),
                            "over_budget": s.get("over_budget"),
                            "drift": s["drift"]["statistic"],
                            "drift_reason": s["drift"].get("reason")})  # fmt: skip
    return answers, signals


def summarize(
    exits: np.ndarray, answers: np.ndarray, full: np.ndarray, labels: np.ndarray,
    segments: list[float], full_macs: float, num_exits: int,
) -> dict[str, Any]:  # fmt: skip
    return {
        "n": int(len(labels)),
        "accuracy": float(100.0 * np.mean(answers == labels)),
        "full_depth_accuracy": float(100.0 * np.mean(full == labels)),
        "agreement": float(100.0 * np.mean(answers == full)),
        "acceleration": acceleration(exits, segments, full_macs),
        "exit_fractions": exit_fractions(exits, num_exits),
    }


def scrub(obj: Any, prefix: str) -> Any:
    """`obj` with every string under the temporary directory `prefix` made relative to it (the
    server answers with the path of the thresholds file it wrote): no machine paths in results."""
    if isinstance(obj, dict):
        return {k: scrub(v, prefix) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, prefix) for v in obj]
    if isinstance(obj, str) and obj.startswith(prefix):
        return os.path.relpath(obj, prefix)
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--out", required=True, help="output folder (JSON, PNG plots)")
    p.add_argument("--bundle", default=str(ROOT / "serving" / "default_bundle"))
    p.add_argument("--images", type=int, default=1500, help="clean images (and shifted copies)")
    p.add_argument("--heldout-images", type=int, default=1000,
                   help="further shifted images after the retune (never in a retune sample)")  # fmt: skip
    p.add_argument("--window", type=int, default=100, help="requests per plotted window")
    p.add_argument("--shift", choices=sorted(CORRUPTIONS), default="gaussian_noise")
    p.add_argument("--severity", type=int, choices=(1, 2, 3), default=3)
    p.add_argument(
        "--eps",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="retune EPS (points of agreement), tried in order until the guard holds",
    )
    p.add_argument("--confidence", type=float, default=1.645, help="retune one-sided Z")
    p.add_argument(
        "--table-images",
        type=int,
        default=500,
        help="held-out images per corruption and severity for the table (0: none), "
        "served after the main phases with the retuned thresholds",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import httpx

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = read_cifar10(args.data_dir, train=False)
    n, m = args.images, args.heldout_images
    if n + m > len(test):
        raise SystemExit(f"--images + --heldout-images must be at most {len(test)}")
    corrupt = CORRUPTIONS[args.shift]
    clean_x, clean_y = test.images[:n], test.labels[:n]
    shifted_x = corrupt(clean_x, args.severity, seed=args.seed)
    held_x = corrupt(test.images[n : n + m], args.severity, seed=args.seed + 1)
    held_y = test.labels[n : n + m]

    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    segments = [float(s["macs"]) for s in manifest["segments"]]
    full_macs = float(manifest["full_model"]["macs"])
    num_exits, fallback = len(segments), manifest["fallback"]
    offline_file = json.loads((Path(args.bundle) / "thresholds.json").read_text())
    offline = offline_file["thresholds"]
    # The drift reference shipped with the offline thresholds (exit-1 confidence quantiles on
    # the split they were tuned on): what a freshly deployed server compares traffic with.
    offline_reference = read_reference(offline_file.get("tuned", {}).get("reference"))

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="drift-") as tmp:
        work = Path(tmp)
        bundle = work / "bundle"
        shutil.copytree(args.bundle, bundle, ignore=shutil.ignore_patterns("calibration_cache"))
        proc, url = start_server(bundle, work, window=n)
        try:
            with httpx.Client(base_url=url, timeout=600.0) as client:
                wait_ready(client, proc)
                answers: list[dict[str, Any]] = []
                signals: list[dict[str, Any]] = []
                retunes: dict[str, Any] = {}
                thresholds_used: dict[str, list[float]] = {}
                plan = [("clean", clean_x, clean_y, "retune_clean"),
                        ("shifted", shifted_x, clean_y, "retune_shifted"),
                        ("shifted_heldout", held_x, held_y, None)]  # fmt: skip
                for phase, x, y, retune_name in plan:
                    thresholds_used[phase] = client.get("/v1/model").json()["thresholds"]
                    print(f"{phase}: {len(y)} images, thresholds {thresholds_used[phase]}")
                    a, s = stream(client, phase, x, y, args.window)
                    answers += a
                    signals += s
                    final = wait_drained(client, len(answers))
                    alert_setting = (final["drop_budget"], final["confidence"])
                    signals.append({"phase": phase, "requests": len(y), "time": time.time(),
                                    "rows": final["rows"], "final": True,
                                    "agreement": final["live"]["agreement"],
                                    "estimated_drop": final["live"]["estimated_drop"],
                                    "estimated_drop_lower": final["live"]["estimated_drop_lower"],
                                    "estimated_drop_upper": final["live"]["estimated_drop_upper"],
                                    "tuned_drop": final.get("tuned_drop"),
                                    "alert_level": final.get("alert_level"),
                                    "over_budget": final.get("over_budget"),
                                    "drift": final["drift"]["statistic"],
                                    "drift_reason": final["drift"].get("reason")})  # fmt: skip
                    if retune_name:
                        # EPS values are tried in order until the guard holds (an operator
                        # widening the budget after a refusal); every attempt is recorded.
                        attempts = []
                        for eps in args.eps:
                            body = {"eps": eps, "confidence": args.confidence, "seed": args.seed}
                            t0 = time.monotonic()
                            r = client.post("/v1/thresholds/retune", json=body, headers=AUTH)
                            result = scrub(r.json(), str(work))
                            result.update(request=body, http_status=r.status_code,
                                          seconds=round(time.monotonic() - t0, 2))  # fmt: skip
                            attempts.append(result)
                            print(f"{retune_name} eps={eps}: HTTP {r.status_code} swapped="
                                  f"{result.get('swapped')} guard={result.get('guard')}")  # fmt: skip
                            if result.get("swapped"):
                                break
                        retunes[retune_name] = attempts
                table_phases = []
                tx, ty = (
                    test.images[n : n + args.table_images],
                    test.labels[n : n + args.table_images],
                )
                for name, fn in CORRUPTIONS.items() if args.table_images else ():
                    for sev in (1, 2, 3):
                        phase = f"table:{name}:{sev}"
                        table_phases.append(phase)
                        thresholds_used[phase] = thresholds_used["shifted_heldout"]
                        a, _ = stream(client, phase, fn(tx, sev, seed=args.seed + 2), ty, len(ty))
                        answers += a
                        wait_drained(client, len(answers))
                final_shadow = client.get("/v1/shadow").json()
                export = client.get(f"/v1/shadow?rows={len(answers)}", headers=AUTH).json()
                status = {"sampled": final_shadow.get("sampled"),
                          "dropped": final_shadow.get("dropped"),
                          "rows": final_shadow.get("rows")}  # fmt: skip
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    rows = export["sample"]
    probs = np.asarray(rows["exit_probs"], dtype=np.float32)
    served_rows = np.asarray(rows["served_exits"])
    exits = np.array([a["exit"] for a in answers])
    if probs.shape[0] != len(answers):
        raise SystemExit(f"shadow rows {probs.shape[0]} != requests {len(answers)}: cannot align")
    aligned = float(np.mean(served_rows == exits))
    phase_of = np.array([a["phase"] for a in answers])
    label = np.array([a["label"] for a in answers])
    served = np.array([a["answer"] for a in answers])
    full = probs[:, -1].argmax(axis=1)
    off_ans, off_exits = decide(probs, offline, fallback)
    off_ans = off_ans.argmax(axis=1)

    phases: dict[str, Any] = {}
    for phase in ("clean", "shifted", "shifted_heldout", *table_phases):
        sel = phase_of == phase
        phases[phase] = {
            "thresholds": thresholds_used[phase],
            "drift_vs_offline_reference": None
            if offline_reference is None
            else ks_against_quantiles(offline_reference.quantiles, exit1_confidence(probs[sel])),
            "served": summarize(
                exits[sel], served[sel], full[sel], label[sel], segments, full_macs, num_exits
            ),  # fmt: skip
            "offline_replayed": summarize(
                off_exits[sel], off_ans[sel], full[sel], label[sel], segments, full_macs, num_exits
            ),  # fmt: skip
            "stale_alert": stale_alert(
                probs[sel], offline, fallback, offline_reference, *alert_setting
            ),  # fmt: skip
        }

    windows = []
    for start in range(0, 2 * n + m, args.window):
        sl = slice(start, start + args.window)
        windows.append({
            "phase": str(phase_of[start]), "first_request": start,
            "accuracy": float(100 * np.mean(served[sl] == label[sl])),
            "agreement": float(100 * np.mean(served[sl] == full[sl])),
            "full_depth_accuracy": float(100 * np.mean(full[sl] == label[sl])),
            "offline_agreement": float(100 * np.mean(off_ans[sl] == full[sl])),
            "acceleration": acceleration(exits[sl], segments, full_macs),
            "offline_acceleration": acceleration(off_exits[sl], segments, full_macs),
            "exit_fractions": exit_fractions(exits[sl], num_exits),
        })  # fmt: skip

    result = {
        "command": "python scripts/drift_experiment.py " + " ".join(
            a if not os.path.isabs(a) else Path(a).name for a in (argv or sys.argv[1:])),
        "bundle": manifest["name"] + " " + manifest["version"],
        "shift": {"corruption": args.shift, "severity": args.severity,
                  "parameter": {"gaussian_noise": NOISE_SIGMA, "gaussian_blur": BLUR_SIGMA,
                                "low_contrast": CONTRAST_FACTOR}[args.shift][args.severity - 1]},
        "images": {"clean": n, "shifted": n, "shifted_heldout": m,
                   "source": "CIFAR-10 test batch, first N (clean and shifted), next M (held out)"},
        "retune_request": {"eps_tried_in_order": args.eps, "confidence": args.confidence,
                           "seed": args.seed},
        "offline_thresholds": offline,
        "alignment": {"served_exit_matches_shadow_row": aligned, **status},
        "phases": phases,
        "retunes": retunes,
        "signals": signals,
        "windows": windows,
        "wall_seconds": round(time.time() - started, 1),
    }  # fmt: skip
    atomic_write_json(out / "results.json", result)
    plot(result, out / "drift_over_time.png", args.window)
    for k, v in phases.items():
        sv, off = v["served"], v["offline_replayed"]
        print(
            f"{k:28s} acc {sv['accuracy']:5.1f} agree {sv['agreement']:5.1f} "
            f"accel {sv['acceleration']:.2f} | offline agree {off['agreement']:5.1f} "
            f"accel {off['acceleration']:.2f} | full acc {sv['full_depth_accuracy']:5.1f} | "
            f"stale alert {v['stale_alert']['estimated_drop_lower']:5.2f} vs "
            f"{v['stale_alert']['alert_level']:.2f}: {v['stale_alert']['over_budget']}"
        )
    return 0


def plot(result: dict[str, Any], path: Path, window: int) -> None:
    plt = pyplot()
    w = result["windows"]
    x = [v["first_request"] + window for v in w]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax = axes[0]
    ax.plot(x, [v["agreement"] for v in w], "o-", label="agreement with full depth (served)")
    ax.plot(
        x,
        [v["offline_agreement"] for v in w],
        "x--",
        label="agreement, offline thresholds replayed",
    )
    ax.plot(x, [v["accuracy"] for v in w], "s-", label="accuracy (served)")
    ax.plot(x, [v["full_depth_accuracy"] for v in w], ":", label="accuracy (full depth)")
    ax.set_ylabel("% per window")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    ax.plot(x, [v["acceleration"] for v in w], "o-", label="served")
    ax.plot(x, [v["offline_acceleration"] for v in w], "x--", label="offline thresholds replayed")
    ax.set_ylabel("MAC acceleration")
    ax.legend(fontsize=7)
    ax = axes[2]
    s = [v for v in result["signals"] if not v.get("final")]
    offsets, base = {}, 0
    for ph in ("clean", "shifted", "shifted_heldout"):
        offsets[ph] = base
        base += result["images"][ph]
    sx = [offsets[v["phase"]] + v["requests"] for v in s]
    ax.plot(sx, [np.nan if v["drift"] is None else v["drift"] for v in s], "o-",
            label="drift (KS, exit-1 confidence)")  # fmt: skip
    # Drained readings: /v1/shadow after the sampler caught up at the end of each phase (the
    # in-stream readings lag: the sampler yields to queued requests).
    d = [v for v in result["signals"] if v.get("final")]
    dx = [offsets[v["phase"]] + v["requests"] for v in d]
    ax.plot(dx, [np.nan if v["drift"] is None else v["drift"] for v in d], "k*", ms=14,
            label="drift, sampler drained (end of phase)")  # fmt: skip
    ax.set_ylabel("drift statistic")
    ax2 = ax.twinx()
    # The alert compares the drop's lower bound with its level (budget above the tuned drop).
    ax2.plot(sx, [v["estimated_drop_lower"] for v in s], "r^--", label="est. drop, lower bound")
    ax2.plot(dx, [v["estimated_drop_lower"] for v in d], "rP", ms=12, label="drained")
    ax2.step(sx, [v["alert_level"] for v in s], "m:", where="post", label="alert level")
    ax2.set_ylabel("points", color="r")
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("requests")
    for a in axes:
        for ph, label in (("shifted", "shift + retune(clean)"),
                          ("shifted_heldout", "retune(shifted)")):  # fmt: skip
            a.axvline(offsets[ph], color="k", lw=0.8)
            a.text(offsets[ph], a.get_ylim()[1], label, fontsize=7, va="top")
    fig.suptitle(f"{result['shift']['corruption']} severity {result['shift']['severity']}: "
                 "stale thresholds, drift, live retune")  # fmt: skip
    save_png(fig, path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
