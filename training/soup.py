"""Weight averaging ("model soup") of networks trained from one starting point.

Networks fine-tuned from the same weights (here: several draws of a second learning-rate cycle,
differing only in data order and augmentation) usually sit in one basin, and the average of
their weights often classifies better than any of them (Wortsman et al., 2022, "Model soups";
Izmailov et al., 2018, SWA). The average costs nothing at inference: it is one network of the
same architecture.

Averaging happens on the *folded* networks (`training.folding`): each convolution with its
BatchNorm as one affine map, which is what each ingredient computes in eval mode. Two
ingredients with different BatchNorm parametrisations of the same function (a trained
checkpoint and weights recovered from a bundle's ONNX graphs) then average as the functions
they are, and the soup of identical ingredients is that ingredient exactly. Linear layers
average directly. BatchNorm is then set by `bn`:

- `fold`: identity BatchNorms carrying the averaged folded bias, so the soup in eval mode is
  exactly the averaged affine maps. No data needed. Train-mode BatchNorm would normalise these
  layers by batch statistics, so re-normalise (`repair`) before training such a soup further.
- `repair` (REPAIR, Jordan et al., 2023): every BatchNorm's output gets, per channel, the mean
  and standard deviation averaged over the ingredients (averaging weights shrinks activation
  variance), and its running statistics are recomputed from the soup's own activations on
  augmented training batches, as SWA does.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.bundle import sha256_file
from core.datasets import DatasetError, ImageArrays, recipe_split

from .checkpoint_io import derived_checkpoint, read_checkpoint
from .data.loader import BatchLoader
from .engine import exported_weights, predict
from .export.checkpoint import CheckpointError, build_model, validate_checkpoint
from .folding import (
    augmented_batches,
    batchnorms,
    channel_statistics,
    fold_state,
    unfold_identity,
)

log = logging.getLogger("earlyexit.soup")

BN_MODES = ("fold", "repair")


class SoupError(ValueError):
    """Ingredients or options that cannot make a soup (bad input: one line, exit 2)."""


@dataclass(frozen=True)
class SoupConfig:
    """What a soup is made of; written beside it (soup.json) and into its checkpoint."""

    ingredients: tuple[str, ...]  # checkpoint files as the user named them
    bn: str = "fold"
    weights: tuple[float, ...] = ()  # empty: uniform
    batches: int = 40  # training batches of 256 rows for `repair`'s statistics
    seed: int = 0
    data_dir: str | None = None  # default: the template checkpoint's data_dir

    def validate(self) -> None:
        if len(self.ingredients) < 2:
            raise SoupError("a soup needs at least two ingredients")
        if self.bn not in BN_MODES:
            raise SoupError(f"--bn {self.bn!r}: choose from {', '.join(BN_MODES)}")
        if self.weights:
            if len(self.weights) != len(self.ingredients):
                raise SoupError(
                    f"--weights has {len(self.weights)} values for "
                    f"{len(self.ingredients)} ingredients"
                )
            if any(not w > 0 for w in self.weights):  # also refuses NaN
                raise SoupError(f"--weights must all be positive, got {list(self.weights)}")
        if self.batches < 1:
            raise SoupError(f"--batches must be >= 1, got {self.batches}")

    def mixing(self) -> list[float]:
        raw = list(self.weights) if self.weights else [1.0] * len(self.ingredients)
        total = sum(raw)
        return [w / total for w in raw]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclass
class Ingredient:
    name: str
    state: dict[str, torch.Tensor]
    checkpoint: dict[str, Any] | None  # None: a bare state_dict (e.g. recovered from a bundle)
    sha256: str


def load_ingredient(path: str) -> Ingredient:
    """A training checkpoint (its EMA weights when it has them) or a bare state_dict file."""
    loaded = read_checkpoint(path, SoupError)
    name = _portable(path)
    if isinstance(loaded, dict) and "model" in loaded and "config" in loaded:
        try:
            validate_checkpoint(loaded, path)
        except CheckpointError as exc:
            raise SoupError(str(exc)) from exc
        return Ingredient(name, dict(exported_weights(loaded)), loaded, sha256_file(path))
    if (
        isinstance(loaded, dict)
        and loaded
        and all(isinstance(v, torch.Tensor) for v in loaded.values())
    ):
        return Ingredient(name, dict(loaded), None, sha256_file(path))
    raise SoupError(f"{path}: neither a training checkpoint nor a state_dict of tensors")


def check_same_network(template: dict[str, torch.Tensor], ing: Ingredient) -> None:
    missing = sorted(set(template) - set(ing.state))
    extra = sorted(set(ing.state) - set(template))
    if missing or extra:
        first = (missing or extra)[0]
        why = "lacks" if missing else "has an extra"
        raise SoupError(
            f"{ing.name} is not the template's network: it {why} {first!r} "
            f"({len(missing)} missing, {len(extra)} extra)"
        )
    for key, ref in template.items():
        if tuple(ing.state[key].shape) != tuple(ref.shape):
            raise SoupError(
                f"{ing.name}: {key} has shape {tuple(ing.state[key].shape)}, the template's "
                f"{tuple(ref.shape)}"
            )


def average_folded(
    folded: list[dict[str, torch.Tensor]], mixing: list[float]
) -> dict[str, torch.Tensor]:
    """The weighted mean of every floating-point entry (integers: the first ingredient's)."""
    out: dict[str, torch.Tensor] = {}
    for key, first in folded[0].items():
        if first.is_floating_point():
            out[key] = sum(w * f[key] for w, f in zip(mixing, folded, strict=True))  # type: ignore[assignment]
        else:
            out[key] = first.clone()
    return out


def output_statistics(
    model: nn.Module,
    norms: dict[str, nn.BatchNorm2d],
    batches: list[torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per channel, the mean and standard deviation of every BatchNorm's output in eval mode."""
    model.eval()
    stats = channel_statistics(model, dict(norms), batches, of="output")
    return {name: (mean, var.sqrt()) for name, (mean, var) in stats.items()}


@torch.no_grad()
def renormalise(
    model: nn.Module,
    norms: dict[str, nn.BatchNorm2d],
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    batches: list[torch.Tensor],
) -> None:
    """REPAIR: each BatchNorm outputs the target mean/std per channel, normalising by running
    statistics recomputed (cumulative average, as SWA's update) from the model's own
    train-mode activations on `batches`."""
    for name, bn in norms.items():
        mean, std = targets[name]
        bn.weight.copy_(std.to(bn.weight.dtype))
        bn.bias.copy_(mean.to(bn.bias.dtype))
        bn.reset_running_stats()
    momenta = {name: bn.momentum for name, bn in norms.items()}
    for bn in norms.values():
        bn.momentum = None  # cumulative moving average over all batches
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for name, bn in norms.items():
            bn.momentum = momenta[name]
        model.eval()


def make_soup(config: SoupConfig) -> tuple[dict[str, Any], list[Ingredient]]:
    """The soup as a training checkpoint (the first full checkpoint among the ingredients is the
    template for everything but the weights) and the loaded ingredients."""
    config.validate()
    ingredients = [load_ingredient(path) for path in config.ingredients]
    templates = [ing for ing in ingredients if ing.checkpoint is not None]
    if not templates:
        raise SoupError(
            "at least one ingredient must be a training checkpoint (its config names the "
            "network); the others may be bare state_dicts"
        )
    template = templates[0].checkpoint
    assert template is not None  # filtered above
    try:
        model = build_model(template)
    except CheckpointError as exc:
        raise SoupError(str(exc)) from exc
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    for ing in ingredients:
        check_same_network(reference, ing)
    try:
        norms = batchnorms(model)
    except ValueError as exc:
        raise SoupError(f"cannot fold this network: {exc}") from exc
    mixing = config.mixing()
    folded = [fold_state(ing.state, norms) for ing in ingredients]
    state = unfold_identity(average_folded(folded, mixing), norms, reference)
    if config.bn == "repair":
        batches = _statistics_batches(template, config)
        targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for w, ing in zip(mixing, ingredients, strict=True):
            model.load_state_dict(ing.state)
            for name, (mean, std) in output_statistics(model, norms, batches).items():
                old = targets.get(name)
                targets[name] = (
                    (w * mean, w * std) if old is None else (old[0] + w * mean, old[1] + w * std)
                )
        model.load_state_dict(state)
        renormalise(model, norms, targets, batches)
        state = {k: v.clone() for k, v in model.state_dict().items()}
    soup = derived_checkpoint(template, state)
    soup["config"] = dict(template["config"])
    extra = dict(soup["config"].get("extra") or {})
    # Relative paths, names and hashes only: the soup must not carry this machine's paths.
    extra["soup"] = {
        **config.to_dict(),
        "ingredients": [_portable(p) for p in config.ingredients],
        "data_dir": None,
        "ingredient_sha256": [ing.sha256 for ing in ingredients],
    }
    soup["config"]["extra"] = extra
    return soup, ingredients


def _portable(path: str) -> str:
    """A path as recorded in an artifact: relative paths as given, absolute ones by name."""
    return Path(path).name if Path(path).is_absolute() else Path(path).as_posix()


def _statistics_batches(template: dict[str, Any], config: SoupConfig) -> list[torch.Tensor]:
    train = load_data(template, config, "train")
    cfg = template["config"]
    batches = augmented_batches(
        train, cfg, tuple(template["mean"]), tuple(template["std"]), config.batches, config.seed
    )
    return list(batches)


def load_data(template: dict[str, Any], config: SoupConfig, split: str) -> ImageArrays:
    try:
        return recipe_split(template["config"], config.data_dir or None, split)
    except DatasetError as exc:
        raise SoupError(str(exc)) from exc


def accuracy_metrics(
    predictions: np.ndarray, ensemble: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """`engine.evaluate`'s metrics (percent per exit, last, ensemble) from `predict`'s output."""
    metrics = {
        f"acc_exit{k + 1}": round(float((row == labels).mean() * 100), 4)
        for k, row in enumerate(predictions)
    }
    metrics["acc_last"] = metrics[f"acc_exit{len(predictions)}"]
    metrics["acc_ensemble"] = round(float((ensemble == labels).mean() * 100), 4)
    return metrics


def score(
    checkpoint: dict[str, Any], state: dict[str, torch.Tensor], data: ImageArrays
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Accuracy metrics, per-exit predictions (K×N) and ensemble predictions of one network."""
    model = build_model({**checkpoint, "model": state, "ema_model": None})
    loader = BatchLoader(
        data, 500, tuple(checkpoint["mean"]), tuple(checkpoint["std"]), train=False
    )
    predictions, ensemble = predict(model, loader, torch.device("cpu"))
    labels = data.labels.astype(np.int64)
    return accuracy_metrics(predictions, ensemble, labels), predictions, ensemble


def broken_exits(report: dict[str, Any], margin: float = 5.0) -> list[int]:
    """Exits (1-based) whose soup scores more than `margin` points below its worst ingredient on
    val: averaging broke them, which happens when those parts of the ingredients did not start
    from the same weights (e.g. a head each draw initialised at random)."""
    soup = _exit_accuracies(report["soup"]["val"])
    worst = [
        min(_exit_accuracies(entry["val"])[k] for entry in report["ingredients"])
        for k in range(len(soup))
    ]
    return [
        k + 1 for k, (mine, low) in enumerate(zip(soup, worst, strict=True)) if mine < low - margin
    ]


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Per-exit validation and test accuracy of every ingredient (thin) and the soup (bold)."""
    from core.plots import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, split in zip(axes, ("val", "test"), strict=True):
        for entry in report["ingredients"]:
            accs = _exit_accuracies(entry[split])
            ax.plot(range(1, len(accs) + 1), accs, "o-", lw=1, alpha=0.6, label=entry["name"])
        accs = _exit_accuracies(report["soup"][split])
        ax.plot(range(1, len(accs) + 1), accs, "s-", lw=2.5, color="black", label="soup")
        ax.set_xticks(range(1, len(accs) + 1))
        ax.set_xlabel("exit")
        ax.set_title(f"{split} accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, tight=False)


def _exit_accuracies(metrics: dict[str, float]) -> list[float]:
    count = sum(1 for key in metrics if key.startswith("acc_exit"))
    return [metrics[f"acc_exit{k}"] for k in range(1, count + 1)]
