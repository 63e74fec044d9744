"""Keep a subset of a trained network's exits: a finished run directory of its own.

On a frozen backbone every exit head trains independently of the others, so one run with an
exit after every block (configs/r18w05_soup_heads_frozen_allblocks.yaml) holds every placement
at once. This script writes the network with only the exits after `--exit-blocks` (the final
exit is always kept): the backbone and the heads at those blocks bit for bit, scored per exit
on val and test like a training run (best.pt, config.json, test_metrics.json,
test_predictions.npz), for `earlyexit-export --checkpoint`.

    python scripts/select_exits.py --run runs/soup_heads/all --exit-blocks 1,2,4,6 \\
        --out runs/soup_heads/sel_1246 --data-dir ../shared/data

`--heads-from` takes the heads of another network with the same backbone (the one the run's
heads were trained on), at every block both exit after or only at `--heads-from-blocks`.

Bad input (no such run, blocks the run has no exit after, a network that does not fit) is
one line on stderr and exit 2, with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

logger = logging.getLogger("select_exits")


class SelectError(ValueError):
    """The run or the chosen blocks cannot give the network (bad input: one line, exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="select_exits.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--run", required=True, type=Path, help="a training run directory (best.pt)")
    p.add_argument(
        "--exit-blocks",
        required=True,
        help="comma-separated 1-based blocks to keep an exit after (the final exit is kept)",
    )
    p.add_argument("--out", required=True, type=Path, help="the new run directory")
    p.add_argument(
        "--heads-from",
        type=Path,
        help="a checkpoint with the same backbone (e.g. the model the run's heads were trained "
        "on): its heads replace the run's at the blocks both exit after",
    )
    p.add_argument(
        "--heads-from-blocks",
        help="with --heads-from: take its heads only at these comma-separated blocks (default: "
        "every block both exit after), e.g. when one of its heads is broken, as a soup's head "
        "that each ingredient initialised at random is",
    )
    p.add_argument("--data-dir", help="dataset directory (default: the run's own)")
    p.add_argument("--threads", type=int, default=1)
    return p


def select(
    run: Path,
    blocks: tuple[int, ...],
    data_dir: str | None,
    heads_from: Path | None = None,
    heads_from_blocks: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """The checkpoint of `run` with exits after `blocks` only (heads at blocks `heads_from`
    exits after taken from it, or only at `heads_from_blocks`), val metrics filled in."""
    import torch

    from training.checkpoint_io import derived_checkpoint, read_checkpoint
    from training.config import TrainConfig
    from training.costs import measure_costs
    from training.engine import (
        InitError,
        checkpoint_exit_points,
        exported_weights,
        load_backbone,
        load_exit_heads,
        network_from_config,
    )
    from training.soup import score

    source = run / "best.pt"
    checkpoint = read_checkpoint(source, SelectError, "--run")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise SelectError(f"--run {run}: best.pt is not a training checkpoint")
    config = dict(checkpoint["config"])
    if not config.get("exit_blocks"):
        raise SelectError(f"--run {run}: its exits sit at stage ends; nothing to select from")
    have = tuple(int(b) for b in config["exit_blocks"])
    extra = sorted(set(blocks) - set(have))
    if extra:
        raise SelectError(f"--exit-blocks {extra}: {run} has exits after blocks {list(have)} only")
    if heads_from_blocks is not None:
        if heads_from is None:
            raise SelectError("--heads-from-blocks needs --heads-from")
        outside = sorted(set(heads_from_blocks) - set(blocks))
        if outside:
            raise SelectError(
                f"--heads-from-blocks {outside}: not among the kept --exit-blocks {list(blocks)}"
            )
    known = {f.name for f in TrainConfig.__dataclass_fields__.values()}
    base = TrainConfig(**{k: v for k, v in config.items() if k in known})
    cfg = replace(
        base,
        exits=len(blocks) + 1,
        exit_blocks=tuple(blocks),
        # Only for loading here: the saved config is the run's own, with the exits kept.
        init=str(source),
        init_heads=True,
    )
    model = network_from_config(cfg, int(checkpoint["num_classes"]))
    try:
        load_backbone(model, cfg)
    except InitError as exc:
        raise SelectError(str(exc)) from exc
    if heads_from is not None:
        other = read_checkpoint(heads_from, SelectError, "--heads-from")
        if not isinstance(other, dict) or "model" not in other or "config" not in other:
            raise SelectError(f"--heads-from {heads_from}: not a training checkpoint")
        mine = model.backbone.state_dict()
        theirs = exported_weights(other)  # as load_backbone reads a checkpoint: EMA if any
        if any(
            f"backbone.{k}" not in theirs or not torch.equal(v, theirs[f"backbone.{k}"])
            for k, v in mine.items()
        ):
            raise SelectError(
                f"--heads-from {heads_from}: its backbone differs from the run's; heads only "
                "carry over between networks with the same frozen backbone"
            )
        # The run's own heads at the blocks --heads-from-blocks leaves out, restored after.
        keep = {
            k: {n: v.clone() for n, v in model.heads[k].state_dict().items()}
            for k, block in enumerate(blocks)
            if heads_from_blocks is not None and block not in heads_from_blocks
        }
        try:
            load_exit_heads(model, cfg, heads_from, theirs, checkpoint_exit_points(other, model))
        except InitError as exc:
            raise SelectError(str(exc)) from exc
        for k, own in keep.items():
            model.heads[k].load_state_dict(own)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = derived_checkpoint(checkpoint, state)
    # Costs per exit change with the exits kept (fewer heads on each path).
    out["costs"] = measure_costs(model, tuple(checkpoint["input_shape"])).to_dict()
    saved = dict(config)
    saved["exits"] = len(blocks) + 1
    saved["exit_blocks"] = list(blocks)
    saved["extra"] = {
        **dict(config.get("extra") or {}),
        "selected_from": {
            "run": run.name,
            "exit_blocks": list(have),
            "heads_from": None if heads_from is None else heads_from.name,
            "heads_from_blocks": None if heads_from_blocks is None else list(heads_from_blocks),
        },
    }
    out["config"] = saved
    val, _, _ = score(out, state, split_of(out, data_dir, "val"))
    out["val_metrics"] = val
    out["best_value"] = val["acc_last"]
    return out


def split_of(checkpoint: dict[str, Any], data_dir: str | None, split: str) -> Any:
    """The split the checkpoint's recipe names (its val rows held out as in training)."""
    from core.datasets import DatasetError, recipe_split

    try:
        return recipe_split(checkpoint["config"], data_dir or None, split)
    except DatasetError as exc:
        raise SelectError(str(exc)) from exc


def parse_blocks(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated 1-based block indices, strictly increasing."""
    try:
        blocks = tuple(int(b) for b in str(text).split(",") if b.strip())
    except ValueError as exc:
        raise SelectError(f"{flag} {text!r}: not integers") from exc
    if not blocks or list(blocks) != sorted(set(blocks)):
        raise SelectError(f"{flag} {text!r}: must increase strictly")
    return blocks


def run_cli(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from core.atomic import atomic_write_json
    from training.compare import PREDICTIONS
    from training.engine import atomic_torch_save, save_predictions
    from training.soup import score

    blocks = parse_blocks(args.exit_blocks, "--exit-blocks")
    heads_blocks = (
        None
        if args.heads_from_blocks is None
        else parse_blocks(args.heads_from_blocks, "--heads-from-blocks")
    )
    if args.threads < 1:
        raise SelectError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    checkpoint = select(args.run, blocks, args.data_dir, args.heads_from, heads_blocks)
    test_data = split_of(checkpoint, args.data_dir, "test")
    test, predictions, ensemble = score(checkpoint, checkpoint["model"], test_data)
    logger.info("val %s", checkpoint["val_metrics"])
    logger.info("test %s", test)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(checkpoint, args.out / "best.pt")
    atomic_write_json(args.out / "config.json", checkpoint["config"])
    atomic_write_json(args.out / "test_metrics.json", {"final": test, "best": test})
    labels = test_data.labels.astype(np.int64)
    save_predictions(args.out / PREDICTIONS, predictions, ensemble, labels)
    logger.info("wrote %s", args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run_cli(args)
    except (SelectError, ValueError) as exc:
        print(f"select_exits.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
