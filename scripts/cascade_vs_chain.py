"""A cascade into the plain model vs the early-exit chain alone, on one bundle (issue #16).

The chain answers a row no shallow exit takes with its own final exit; the cascade runs the
bundle's exits 1..K-1 and hands such a row to the plain model (the manifest's `baseline`
graph, which shares no features with the chain, so that row pays exits 1..K-1 *and* the whole
plain model). Both use the same rule (max probability above t_k), the same grid of thresholds
t_1..t_{K-1} on [0, 1] on val (the chain's rest is exit K, no ensemble fallback; `earlyexit-tune`
searches that too) and the same choice: the most MAC acceleration whose val accuracy is at
least each floor. Test rows are only read to report the chosen thresholds.

    python scripts/cascade_vs_chain.py --bundle bundles/sd_fast --data-dir DATA \
        --out docs/results/cascade

Writes OUT/results.json and OUT/frontier.png. Exits 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.atomic import atomic_write_json  # noqa: E402
from core.bundle import BundleError, load_manifest, plain_graph  # noqa: E402
from core.datasets import DatasetError, load_split  # noqa: E402
from core.decision import FALLBACK_EXIT, decide  # noqa: E402
from core.plots import pyplot, save_png  # noqa: E402

FLOORS_BELOW_PLAIN = (1.5, 1.0, 0.7, 0.5, 0.3, 0.0)


def plain_predictions(bundle: Path, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from serving.plain_runtime import PlainModelRuntime

    runtime = PlainModelRuntime(bundle, providers=("cpu",), intra_op_threads=1)
    data = load_split("cifar10", data_dir, split)
    preds = [
        runtime.run(runtime.preprocess(data.images[i : i + 500])).argmax(axis=1)
        for i in range(0, len(data.labels), 500)
    ]
    return np.concatenate(preds), data.labels


def grid_search(
    probs: np.ndarray,
    labels: np.ndarray,
    rest_correct: np.ndarray,
    costs: np.ndarray,
    rest_cost: float,
    grid: np.ndarray,
) -> np.ndarray:
    """Rows (accuracy %, mean MACs, t_1, t_2, t_3) for every threshold triple on the grid, for
    exits 1..3 and a last stage that answers the rest with `rest_correct` at `rest_cost`."""
    conf, pred = probs.max(axis=2), probs.argmax(axis=2)
    right = pred == labels[:, None]
    n = len(labels)
    out = []
    for t1 in grid:
        a1 = conf[:, 0] > t1
        for t2 in grid:
            a2 = ~a1 & (conf[:, 1] > t2)
            rest = ~a1 & ~a2
            a3 = rest[None, :] & (conf[None, :, 2] > grid[:, None])  # every t_3 at once
            r = rest[None, :] & ~a3
            correct = (
                (a1 & right[:, 0]).sum()
                + (a2 & right[:, 1]).sum()
                + (a3 & right[None, :, 2]).sum(axis=1)
                + (r & rest_correct[None, :]).sum(axis=1)
            )
            macs = (
                a1.sum() * costs[0]
                + a2.sum() * costs[1]
                + a3.sum(axis=1) * costs[2]
                + r.sum(axis=1) * rest_cost
            )
            block = np.column_stack(
                [
                    100.0 * correct / n,
                    macs / n,
                    np.full(len(grid), t1),
                    np.full(len(grid), t2),
                    grid,
                ]
            )
            out.append(block)
    return np.concatenate(out)


def evaluate(
    probs: np.ndarray,
    labels: np.ndarray,
    rest_correct: np.ndarray,
    costs: np.ndarray,
    rest_cost: float,
    thresholds: list[float],
) -> tuple[float, float]:
    """(accuracy %, mean MACs) of one threshold triple by the project's rule (`decide` on exits
    1..3; a row none takes goes to the last stage): what `grid_search` vectorises."""
    answers, exits = decide(probs[:, : len(thresholds)], thresholds, "last")
    taken = exits != FALLBACK_EXIT
    correct = np.where(taken, answers.argmax(axis=1) == labels, rest_correct)
    macs = np.where(taken, costs[np.maximum(exits, 1) - 1], rest_cost)
    return 100.0 * float(correct.mean()), float(macs.mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step", type=float, default=0.01, help="threshold grid step on [0, 1]")
    args = p.parse_args(argv)
    try:
        manifest = load_manifest(args.bundle)
        plain = plain_graph(manifest)
        if plain.source != "baseline":
            raise BundleError("the bundle's manifest names no baseline graph (the plain model)")
        if manifest.num_exits != 4:
            raise BundleError(f"this study needs 4 exits, the bundle has {manifest.num_exits}")
        from thresholds.calibrate import load_or_collect

        cal = {
            s: load_or_collect(args.bundle, manifest, "cifar10", args.data_dir, s)
            for s in ("val", "test")
        }
        plains = {s: plain_predictions(args.bundle, args.data_dir, s) for s in ("val", "test")}
    except (BundleError, DatasetError, OSError, ValueError) as exc:
        print(f"cascade_vs_chain: error: {exc}", file=sys.stderr)
        return 2
    cum = np.cumsum(manifest.segment_macs())
    full = float(manifest.full_model.macs)
    plain_macs = float(plain.macs or full)
    if not 0.001 <= args.step <= 0.5:
        print("cascade_vs_chain: error: --step must lie in [0.001, 0.5]", file=sys.stderr)
        return 2
    grid = np.round(np.arange(0.0, 1.0 + 1e-9, args.step), 4)
    results: dict[str, Any] = {
        "bundle": f"{manifest.name} {manifest.version}",
        "grid_step": args.step,
    }
    for split in ("val", "test"):
        labels = cal[split].labels
        preds, plain_labels = plains[split]
        if not np.array_equal(labels, plain_labels):
            print(
                "cascade_vs_chain: error: calibration rows do not match the split", file=sys.stderr
            )
            return 2
        final = cal[split].exit_probs[:, -1].argmax(axis=1)
        results[split] = {
            "plain_accuracy": 100.0 * float(np.mean(preds == labels)),
            "chain_final_accuracy": 100.0 * float(np.mean(final == labels)),
        }
    searches = {}
    for method in ("chain", "cascade"):
        per_split = {}
        for split in ("val", "test"):
            c = cal[split]
            if method == "chain":
                rest_correct = c.exit_probs[:, -1].argmax(axis=1) == c.labels
                rest_cost = float(cum[3])
            else:
                rest_correct = plains[split][0] == c.labels
                rest_cost = float(cum[2]) + plain_macs
            per_split[split] = (c.exit_probs, c.labels, rest_correct, rest_cost)
        searches[method] = per_split
    plain_val = results["val"]["plain_accuracy"]
    rows = []
    for method, per_split in searches.items():
        table = grid_search(*per_split["val"][:3], cum, per_split["val"][3], grid)
        for below in FLOORS_BELOW_PLAIN:
            floor = plain_val - below
            ok = table[table[:, 0] >= floor - 1e-9]
            entry: dict[str, Any] = {"method": method, "val_floor": floor, "below_plain": below}
            if len(ok) == 0:
                entry["feasible"] = False
                rows.append(entry)
                continue
            best = ok[np.argmax(full / ok[:, 1])]
            thresholds = [float(t) for t in best[2:]]
            # The vectorised search must agree with the rule itself at the point it picked.
            val_check = evaluate(*per_split["val"][:3], cum, per_split["val"][3], thresholds)
            if not np.allclose(val_check, (best[0], best[1])):
                raise RuntimeError(f"grid search {best[:2]} disagrees with decide {val_check}")
            accuracy, macs = evaluate(*per_split["test"][:3], cum, per_split["test"][3], thresholds)
            entry.update(
                feasible=True,
                thresholds=thresholds,
                val_accuracy=float(best[0]),
                val_acceleration=full / float(best[1]),
                test_accuracy=accuracy,
                test_acceleration=full / macs,
                test_vs_plain=accuracy - results["test"]["plain_accuracy"],
            )
            rows.append(entry)
    results["choices"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    plot(results, args.out / "frontier.png")
    for r in rows:
        if r["feasible"]:
            print(
                f"{r['method']:8s} val floor {r['val_floor']:.2f}: val {r['val_accuracy']:.2f} "
                f"{r['val_acceleration']:.3f}x | test {r['test_accuracy']:.2f} "
                f"({r['test_vs_plain']:+.2f}) {r['test_acceleration']:.3f}x"
            )
        else:
            print(f"{r['method']:8s} val floor {r['val_floor']:.2f}: infeasible")
    return 0


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("chain", "o-"), ("cascade", "s-")):
        pts = [r for r in results["choices"] if r["method"] == method and r["feasible"]]
        ax.plot(
            [r["test_acceleration"] for r in pts],
            [r["test_accuracy"] for r in pts],
            style,
            label=f"{method} (thresholds tuned on val)",
        )
    plain = results["test"]["plain_accuracy"]
    ax.axhline(plain, color="k", lw=0.8, ls="--", label=f"plain model {plain:.2f} %")
    ax.axhline(plain - 0.5, color="k", lw=0.6, ls=":", label="plain − 0.5")
    ax.set_xlabel("MAC acceleration vs the plain model (test)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    save_png(fig, path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
