"""`earlyexit-soup`: average the weights of networks trained from one start into one network.

    earlyexit-soup runs/c2_s1/best.pt runs/c2_s2/best.pt runs/recovered/c2_s0.pt \\
        --out runs/soup/sd --bn fold --reference runs/soup/plain
    earlyexit-soup --recipe configs/soups/r18w05_sd_cycle2_soup.yaml --out runs/soup/sd

A recipe is a YAML mapping with the keys `ingredients` (list of files), and optionally `bn`,
`weights`, `batches`, `seed`; flags given on the command line override it.

The output directory is a finished run: `best.pt` (what `earlyexit-export --checkpoint` and
`--baseline-run` read, validation accuracy in its `val_metrics`), `config.json`,
`test_metrics.json`, `test_predictions.npz` (per-exit test predictions for paired tests) and
`soup.json` (the recipe, each ingredient's and the soup's validation and test accuracy, and with
`--reference RUN` a McNemar test of the deepest exit against that run's) with its plot
`soup.png`. Ingredients are training checkpoints or bare state_dicts (e.g.
`scripts/recover_weights.py` output); the first training checkpoint names the network.
Method: training/soup.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_json
from serving.cli_common import OneLineParser, UsageError, setup_cli_logging

log = logging.getLogger("earlyexit.soup")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="earlyexit-soup", description=__doc__.split("\n\n")[0])
    p.add_argument("ingredients", nargs="*", help="checkpoints or state_dict files (two or more)")
    p.add_argument("--recipe", type=Path, help="YAML recipe (ingredients, bn, weights, ...)")
    p.add_argument("--out", required=True, help="run directory to write the soup into")
    p.add_argument(
        "--bn",
        help="BatchNorm after averaging: fold (exact average of the folded layers, no data) or "
        "repair (per-channel output statistics averaged over the ingredients, running "
        "statistics recomputed on training batches); default fold",
    )
    p.add_argument("--weights", help="comma-separated mixing weights (default equal)")
    p.add_argument("--batches", type=int, help="repair: training batches of 256 (default 40)")
    p.add_argument("--seed", type=int, help="repair: batch order and augmentation (default 0)")
    p.add_argument("--data-dir", help="dataset directory (default: the template's data_dir)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--reference",
        type=Path,
        help="run directory with test_predictions.npz (e.g. the plain model's soup): soup.json "
        "gets a McNemar test of the deepest exits on the test split",
    )
    return p


RECIPE_KEYS = ("ingredients", "bn", "weights", "batches", "seed")


def _parse_weights(text: Any) -> tuple[float, ...]:
    if text is None or (isinstance(text, str) and not text.strip()):
        return ()
    try:
        items = text.split(",") if isinstance(text, str) else list(text)
        values = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise UsageError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"--weights must be finite, got {text!r}")
    return values


def _reference_test(reference: Path, predictions: Any, labels: Any) -> dict[str, Any]:
    import numpy as np

    from core.stats import mcnemar

    from .compare import read_predictions

    ref = read_predictions(reference)  # run() checked the file is there
    if ref.labels.shape != labels.shape or not np.array_equal(ref.labels, labels):
        raise UsageError(f"--reference {reference}: its test labels are not this test split's")
    test = mcnemar(ref.exits[-1] == ref.labels, predictions[-1] == labels)
    return {"run": reference.name, "deepest_exit_test": test.to_dict()}


def _read_recipe(path: Path) -> dict[str, Any]:
    from .config import load_yaml_config

    if not path.is_file():
        raise UsageError(f"--recipe not found: {path}")
    try:
        recipe = load_yaml_config(path)
    except Exception as exc:  # yaml errors, a list instead of a mapping
        raise UsageError(f"cannot read --recipe {path}: {' '.join(str(exc).split())}") from exc
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise UsageError(
            f"--recipe {path}: unknown key(s) {', '.join(unknown)} "
            f"(known: {', '.join(RECIPE_KEYS)})"
        )
    ingredients = recipe.get("ingredients", [])
    if not isinstance(ingredients, list) or not all(isinstance(i, str) for i in ingredients):
        raise UsageError(f"--recipe {path}: 'ingredients' must be a list of file names")
    return recipe


def soup_config(args: argparse.Namespace) -> Any:
    """The SoupConfig of a recipe file overridden by the flags given."""
    from .soup import SoupConfig

    recipe = _read_recipe(args.recipe) if args.recipe is not None else {}
    ingredients = tuple(args.ingredients) or tuple(recipe.get("ingredients", ()))

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else recipe.get(key, default)

    try:
        batches, seed = int(pick(args.batches, "batches", 40)), int(pick(args.seed, "seed", 0))
    except (TypeError, ValueError):
        raise UsageError("'batches' and 'seed' must be integers") from None
    return SoupConfig(
        ingredients=ingredients,
        bn=str(pick(args.bn, "bn", "fold")),
        weights=_parse_weights(pick(args.weights, "weights", None)),
        batches=batches,
        seed=seed,
        data_dir=args.data_dir,
    )


def run(args: argparse.Namespace, command: str) -> int:
    import numpy as np
    import torch

    from .compare import PREDICTIONS
    from .engine import atomic_torch_save, save_predictions
    from .soup import broken_exits, load_data, make_soup, plot_report, score

    config = soup_config(args)
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.reference is not None and not (args.reference / PREDICTIONS).is_file():
        raise UsageError(f"--reference {args.reference}: no {PREDICTIONS} there")
    torch.set_num_threads(args.threads)
    soup, ingredients = make_soup(config)
    splits = {split: load_data(soup, config, split) for split in ("val", "test")}
    report: dict[str, Any] = {
        "recipe": soup["config"]["extra"]["soup"],
        "ingredients": [],
        "soup": {},
    }
    for ing in ingredients:
        entry: dict[str, Any] = {"name": ing.name, "sha256": ing.sha256}
        for split, data in splits.items():
            entry[split], _, _ = score(soup, ing.state, data)
        log.info(
            "%s: val %.2f %%, test %.2f %% (deepest exit)",
            ing.name,
            entry["val"]["acc_last"],
            entry["test"]["acc_last"],
        )
        report["ingredients"].append(entry)
    val, _, _ = score(soup, soup["model"], splits["val"])
    test, predictions, ensemble = score(soup, soup["model"], splits["test"])
    report["soup"] = {"val": val, "test": test}
    log.info("soup: val %.2f %%, test %.2f %% (deepest exit)", val["acc_last"], test["acc_last"])
    report["broken_exits"] = broken_exits(report)
    if report["broken_exits"]:
        log.warning(
            "exits %s of the soup score far below every ingredient: their weights did not start "
            "from one network (e.g. heads initialised at random per draw), so they do not average",
            ", ".join(map(str, report["broken_exits"])),
        )
    labels = splits["test"].labels.astype(np.int64)
    if args.reference is not None:
        report["reference"] = _reference_test(args.reference, predictions, labels)
    soup["val_metrics"] = val
    soup["best_value"] = val["acc_last"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(soup, out / "best.pt")
    atomic_write_json(out / "config.json", soup["config"])
    atomic_write_json(out / "test_metrics.json", {"final": test, "best": test})
    save_predictions(out / PREDICTIONS, predictions, ensemble, labels)
    atomic_write_json(out / "soup.json", {**report, "command": command})
    plot_report(report, out / "soup.png")
    log.info("wrote %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging()
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"earlyexit-soup: error: {exc}", file=sys.stderr)
        return 2
    from .soup import SoupError

    try:
        return run(args, "earlyexit-soup " + " ".join(sys.argv[1:] if argv is None else argv))
    except (UsageError, SoupError) as exc:
        print(f"earlyexit-soup: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
