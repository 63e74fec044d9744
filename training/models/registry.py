"""One model registry: `@register_model` per variant, `create_model` as the single front door."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
# Construction options a backbone takes beyond width/stem/in_chans: "groups" (grouped 3×3
# convolutions) and "widths" (per-site channel counts, what structured pruning rebuilds).
_OPTIONS: dict[str, frozenset[str]] = {}
MODEL_OPTIONS = ("groups", "widths")


class UnknownModelError(ValueError):
    """Raised for a name that is not registered; the message lists the valid ones."""


def register_model(
    fn: Callable[..., nn.Module] | None = None, *, options: Sequence[str] = ()
) -> Any:
    """Register a backbone constructor under its function name; duplicates are an error.

    Used bare (`@register_model`) or with the construction options the backbone takes
    (`@register_model(options=("groups", "widths"))`, see `MODEL_OPTIONS`).
    """
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid: {list(MODEL_OPTIONS)}")

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = f.__name__
        if name in _BACKBONES:
            raise ValueError(f"model {name!r} registered twice")
        _BACKBONES[name] = f
        _OPTIONS[name] = frozenset(options)
        return f

    return wrap(fn) if fn is not None else wrap


def model_options(name: str) -> frozenset[str]:
    """The construction options (`MODEL_OPTIONS`) registry backbone `name` takes."""
    _ensure_registered()
    if name not in _BACKBONES:
        raise UnknownModelError(f"unknown model {name!r}; valid: {', '.join(sorted(_BACKBONES))}")
    return _OPTIONS[name]


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    _ensure_registered()
    return sorted(_BACKBONES)


def create_backbone(
    name: str,
    num_classes: int,
    act: str | None = None,
    groups: int = 1,
    widths: dict[str, int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The plain single-exit backbone (what users would deploy without early exits).

    `act` replaces every activation ("relu", "trelu"; None keeps the architecture's own:
    ReLU, ReLU6 in MobileNetV2, T-ReLU in the ResNet-KL family). `groups` sets the groups of
    the residual / VGG 3×3 convolutions where the backbone has the "groups" option; `widths`
    (site → channels, `training.prune`) rebuilds a pruned backbone where it has "widths".
    ValueError for an option the backbone does not take or groups that do not divide a width.
    """
    from .activations import check_activation, set_activation

    options = model_options(name)
    if act is not None:
        check_activation(act)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if groups != 1:
        if "groups" not in options:
            raise ValueError(
                f"{name} takes no groups (grouped convolutions); use {_with('groups')}"
            )
        kwargs["groups"] = groups
    if widths:
        if "widths" not in options:
            raise ValueError(f"{name} cannot be rebuilt pruned; prunable: {_with('widths')}")
        kwargs["widths"] = dict(widths)
    backbone = _BACKBONES[name](num_classes=num_classes, **kwargs)
    if act is not None:
        set_activation(backbone, act)
    return backbone


def _with(option: str) -> str:
    return ", ".join(sorted(n for n, opts in _OPTIONS.items() if option in opts)) or "none"


def create_model(
    name: str,
    num_classes: int,
    exits: int = 4,
    head: str = "attention",
    exit_blocks: tuple[int, ...] | None = None,
    act: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A multi-exit network over backbone `name` with `exits` classifiers (1 = backbone only).

    `head` names the exit-head variant ("attention" = seed 004, "lite", "pool"; see
    `training.models.exits`). `exit_blocks` (1-based block indices, `block_names(name)`) puts
    the shallow exits after any residual block instead of at stage ends; exits is then
    len(exit_blocks) + 1. `act` sets the activation of the backbone and of every exit head
    (None: the backbone's own, ReLU in the heads). kwargs go to the backbone (`width`,
    `stem`, `in_chans`, `groups`, `widths`, ...; see `create_backbone`).
    Raises UnknownModelError for an unknown name and ValueError for an unknown head or when
    `exits` exceeds the backbone's number of stages.
    """
    from .activations import set_activation
    from .multi_exit import MultiExitNetwork

    network = MultiExitNetwork(
        create_backbone(name, num_classes, act=act, **kwargs),
        exits=exits,
        head=head,
        exit_blocks=exit_blocks,
    )
    if act is not None:
        set_activation(network.heads, act)
    return network


def model_kwargs(config: dict[str, Any], in_chans: int) -> dict[str, Any]:
    """`create_model` keyword arguments (besides arch, classes and exits) that a training
    config records: the same network for a checkpoint and for a bundle's provenance."""
    kwargs: dict[str, Any] = {"in_chans": int(in_chans)}
    for key in ("width", "stem", "head", "act"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    if config.get("exit_blocks"):
        kwargs["exit_blocks"] = tuple(int(b) for b in config["exit_blocks"])
    if config.get("groups", 1) != 1:
        kwargs["groups"] = int(config["groups"])
    return kwargs


def _ensure_registered() -> None:
    # Importing the modules runs their @register_model decorators.
    from . import mobilenetv2, resnet, resnet_kl, vgg, wideresnet  # noqa: F401
