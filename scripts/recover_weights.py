"""Recover trainable PyTorch weights from a bundle's exported ONNX graphs.

A bundle keeps only ONNX files, whose exporter folded every BatchNorm into the convolution in
front of it (`X.weight` scaled, `X.weight_bias` added). This script writes a state_dict that
`earlyexit-train --init FILE --init-heads` accepts, so a shipped model can be trained further
(e.g. a second learning-rate cycle) when its training checkpoint is gone.

The folded network is exact in eval mode, but a BatchNorm in train mode normalises by batch
statistics, so "identity" BatchNorms would erase each layer's scale and shift. Instead every
BatchNorm is re-parametrised from the statistics of its own input on training images: with the
folded convolution rescaled to the norm of a fresh Kaiming initialisation (so the first
learning-rate steps act as they would on a network in training) by s,

    running_mean = s·m,  running_var = s²·v,  weight = sqrt(s²·v + eps) / s,  bias = m + b,

which returns the folded output W·x + b exactly in eval mode, and approximately in train mode
(batch statistics ≈ m, v). The script refuses weights whose eval-mode probabilities differ
from the bundle's own runtime on test rows (every exit, or the plain graph), and logs the
final exit's accuracy in both modes.

    python scripts/recover_weights.py --bundle serving/default_bundle --which network \\
        --data-dir ../shared/data --out runs/recovered/network.pt
    python scripts/recover_weights.py --bundle serving/default_bundle --which plain ...
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("recover_weights")

WHICH = ("network", "plain")
TOLERANCE = 1e-3  # max |p_torch - p_onnx| accepted (float32 graphs agree to ~1e-6)


class RecoverError(ValueError):
    """The bundle or data cannot give the weights (bad input: one line, exit 2)."""


def _initializers(paths: list[Path]) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    found: dict[str, np.ndarray] = {}
    for path in paths:
        if not path.is_file():
            raise RecoverError(f"{path}: no such ONNX file")
        for init in onnx.load(str(path)).graph.initializer:
            found.setdefault(init.name.removeprefix("net."), numpy_helper.to_array(init))
    return found


def _conv_before(bn_name: str) -> str:
    from training.folding import conv_before

    try:
        return conv_before(bn_name)
    except ValueError as exc:
        raise RecoverError(str(exc)) from exc


def _read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / "manifest.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecoverError(f"{path}: cannot read the manifest ({exc})") from exc
    cfg = (manifest.get("provenance") or {}).get("training_config")
    if not isinstance(cfg, dict) or "arch" not in cfg:
        raise RecoverError(f"{path}: no provenance.training_config to rebuild the network from")
    return manifest


def _build(manifest: dict[str, Any], which: str, bundle: Path) -> tuple[Any, list[Path]]:
    from training.models import create_model, model_kwargs

    cfg = manifest["provenance"]["training_config"]
    kwargs = model_kwargs(cfg, manifest["input"]["shape"][0])
    if which == "network":
        files = [bundle / s["file"] for s in manifest["segments"]]
        exits = len(files)
    else:
        baseline = manifest.get("baseline") or {}
        if not baseline.get("file"):
            raise RecoverError(f"{bundle}: its manifest names no plain model (baseline.file)")
        files = [bundle / baseline["file"]]
        exits = 1  # the same backbone with one exit; the comparison with the runtime checks it
        kwargs.pop("exit_blocks", None)
    try:
        model = create_model(cfg["arch"], len(manifest["labels"]), exits=exits, **kwargs)
    except ValueError as exc:
        raise RecoverError(f"cannot rebuild {cfg['arch']}: {exc}") from exc
    return model, files


def _runtime_probs(bundle: Path, which: str, images: np.ndarray, labels: np.ndarray) -> Any:
    """Every exit's probabilities (N×K×C) as the bundle's runtime computes them, or the plain
    graph's (N×1×C) as `earlyexit-serve --full-model` does."""
    from core.bundle import BundleError
    from core.calibration import collect_calibration
    from serving.plain_runtime import PlainModelRuntime
    from serving.runtime import EarlyExitRuntime

    try:
        if which == "plain":
            runtime: Any = PlainModelRuntime(bundle, intra_op_threads=1)
        else:
            runtime = EarlyExitRuntime(bundle, intra_op_threads=1)
    except BundleError as exc:
        raise RecoverError(str(exc)) from exc
    probs, _ = collect_calibration(runtime, images, labels, progress=False, plain=which == "plain")
    return probs


def recover(
    bundle: Path, which: str, data_dir: str, batches: int = 40, seed: int = 0
) -> dict[str, Any]:
    """The trainable state_dict of the bundle's network or plain model."""
    import torch
    from torch import nn

    from core.datasets import DatasetError, load_split, recipe_split
    from core.normalize import normalize_images
    from training.folding import channel_statistics

    if which not in WHICH:
        raise RecoverError(f"--which {which!r}: choose from {', '.join(WHICH)}")
    if batches < 1:
        raise RecoverError(f"--batches must be >= 1, got {batches}")
    manifest = _read_manifest(bundle)
    cfg = manifest["provenance"]["training_config"]
    model, files = _build(manifest, which, bundle)
    onnx_weights = _initializers(files)
    state = model.state_dict()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    folded: dict[str, tuple[str, np.ndarray]] = {}
    for name in norms:
        conv = _conv_before(name)
        if f"{conv}.weight" not in onnx_weights:
            raise RecoverError(
                f"{conv}: no folded weight in the ONNX files (exported by another exporter "
                "than the default dynamo one?)"
            )
        # The exporter drops a folded bias that is all zeros.
        zero = np.zeros(onnx_weights[f"{conv}.weight"].shape[0], np.float32)
        folded[name] = (conv, onnx_weights.get(f"{conv}.weight_bias", zero))
    # A multi-exit network classifies with heads.K-1.fc; backbone.fc is in its state_dict but
    # unused, and gets the same weights.
    for key in state:
        owner = key.rpartition(".")[0]
        if owner in folded:
            continue  # BatchNorm: set below
        source = key.replace("backbone.fc.", f"heads.{len(files) - 1}.fc.")
        if source in onnx_weights:
            value = torch.from_numpy(onnx_weights[source].copy()).reshape(state[key].shape)
        elif key.endswith(".bias") and source.removesuffix("bias") + "weight" in onnx_weights:
            value = torch.zeros_like(state[key])  # an all-zero bias is dropped by the exporter
        else:
            raise RecoverError(f"{key}: not in the ONNX files")
        state[key] = value

    # Step 1: identity BatchNorms carrying the folded bias: the folded graph, exact in eval mode.
    for name, (_conv, bias) in folded.items():
        bn = norms[name]
        state[f"{name}.weight"] = torch.ones_like(bn.weight)
        state[f"{name}.bias"] = torch.from_numpy(bias.copy()).float()
        state[f"{name}.running_mean"] = torch.zeros_like(bn.running_mean)
        state[f"{name}.running_var"] = torch.full_like(bn.running_var, 1.0 - bn.eps)
    model.load_state_dict(state)
    model.eval()

    # Step 2: per-channel statistics of every BatchNorm's input on augmented training rows
    # (crop with 4-pixel padding and flip, as training does; never the held-out rows).
    try:
        train = recipe_split(cfg, data_dir, "train")
        test = load_split(cfg["dataset"], data_dir, "test")
    except DatasetError as exc:
        raise RecoverError(str(exc)) from exc
    mean, std = manifest["input"]["mean"], manifest["input"]["std"]
    gen = np.random.default_rng(seed)
    _c, h, w = manifest["input"]["shape"]

    def batches_of_train() -> Any:
        batch_size = min(256, len(train))
        for _ in range(batches):
            imgs = train.images[gen.choice(len(train), size=batch_size, replace=False)]
            pad = np.pad(imgs, ((0, 0), (4, 4), (4, 4)) + ((0, 0),) * (imgs.ndim - 3))
            dy, dx = gen.integers(0, 9, size=2)
            imgs = pad[:, dy : dy + h, dx : dx + w].copy()
            flip = gen.random(batch_size) < 0.5
            imgs[flip] = imgs[flip][:, :, ::-1]
            yield torch.from_numpy(normalize_images(imgs, mean, std))

    stats = channel_statistics(model, dict(norms), batches_of_train(), of="input")

    # Step 3: rescale each folded convolution to the expected norm of a fresh Kaiming (fan_out)
    # initialisation and re-parametrise its BatchNorm from those statistics (module docstring).
    for name, (conv, bias) in folded.items():
        bn = norms[name]
        m, v = stats[name]
        weight = state[f"{conv}.weight"].double()
        fan_out = weight.shape[0] * weight[0, 0].numel()
        s = math.sqrt(weight.numel() * 2.0 / fan_out) / float(weight.norm())
        state[f"{conv}.weight"] = (weight * s).float()
        state[f"{name}.running_mean"] = (s * m).float()
        state[f"{name}.running_var"] = (s * s * v).float()
        state[f"{name}.weight"] = (torch.sqrt(s * s * v + bn.eps) / s).float()
        state[f"{name}.bias"] = (m + torch.from_numpy(np.array(bias, np.float64))).float()
    model.load_state_dict(state)

    # Checks: eval mode reproduces the bundle's runtime at every exit; train mode (batch
    # statistics) is logged to show it starts near eval mode.
    rows = min(512, len(test))
    labels = test.labels[:rows]
    x = normalize_images(test.images[:rows], mean, std)
    model.eval()
    with torch.no_grad():
        mine = np.stack(
            [torch.softmax(z, -1).numpy() for z in model(torch.from_numpy(x)).logits], 1
        )
    diff = float(np.abs(_runtime_probs(bundle, which, test.images[:rows], labels) - mine).max())
    # A train-mode forward updates the running statistics: keep the state from before it.
    recovered = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        train_logits = model(torch.from_numpy(x)).logits[-1]
    model.eval()
    logger.info(
        "%s: max |p_torch - p_onnx| %.2e over %d exit(s); final exit on test[:%d]: %.2f %% "
        "(eval), %.2f %% (train mode, batch statistics)",
        which,
        diff,
        mine.shape[1],
        rows,
        float((mine[:, -1].argmax(1) == labels).mean() * 100),
        float((train_logits.argmax(1).numpy() == labels).mean() * 100),
    )
    if diff > TOLERANCE:
        raise RecoverError(f"the recovered weights differ from the ONNX graphs by {diff:.2e}")
    return recovered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--which", choices=WHICH, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=40, help="training batches of 256 rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        state = recover(args.bundle, args.which, args.data_dir, args.batches, args.seed)
    except RecoverError as exc:
        print(f"recover_weights: {exc}", file=sys.stderr)
        return 2
    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(args.out)
    logger.info("wrote %s (%d tensors)", args.out.name, len(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
