"""Verification of exported files: onnxruntime against torch (probabilities and features), and
the MACs counted on the ONNX graph against torch's count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import MultiExitNetwork
from ..onnx_macs import count_onnx_macs, macs_by_op, relative_difference
from .graphs import GraphJob
from .options import FULL_MODEL_FILE, ExportError


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


@torch.no_grad()
def verify_parity(
    bundle: Path,
    model: MultiExitNetwork,
    inputs: list[np.ndarray],
    stage_files: bool,
    atol: float,
) -> dict[str, tuple[float | None, float | None]]:
    """Per file (probs max abs diff, features max relative diff), worst over `inputs`.

    Each graph is run on torch's own inputs (isolated parity), and the segment chain is also run
    end to end in onnxruntime (ORT features feed the next ORT segment), so error that compounds
    along the chain is caught too.
    """
    k_total = model.num_exits
    sessions = {k: ort_session(bundle / f"segment_{k}.onnx") for k in range(1, k_total + 1)}
    stages = (
        {k: ort_session(bundle / f"stage_{k}.onnx") for k in range(1, k_total)}
        if stage_files
        else {}
    )
    full = ort_session(bundle / FULL_MODEL_FILE)
    worst: dict[str, list[float]] = {}

    def note(file: str, probs_diff: float | None, feat_diff: float | None) -> None:
        old = worst.setdefault(file, [-1.0, -1.0])
        if probs_diff is not None:
            old[0] = max(old[0], probs_diff)
        if feat_diff is not None:
            old[1] = max(old[1], feat_diff)

    for batch in inputs:
        x = torch.from_numpy(batch)
        chain = batch
        for k in range(1, k_total + 1):
            name = f"segment_{k}.onnx"
            last = k == k_total
            feats, logits = model.forward_stage(k, x)
            probs = torch.softmax(logits.float(), dim=-1).numpy()
            in_name = sessions[k].get_inputs()[0].name
            ort_out = sessions[k].run(None, {in_name: x.numpy()})
            chain_out = sessions[k].run(None, {in_name: chain})
            ort_probs, chain_probs = ort_out[-1], chain_out[-1]
            diff = max(
                float(np.abs(ort_probs - probs).max()), float(np.abs(chain_probs - probs).max())
            )
            feat_diff = None
            if not last:
                feat_diff = max(
                    _max_rel(ort_out[0], feats.numpy()), _max_rel(chain_out[0], feats.numpy())
                )
                chain = chain_out[0]
            note(name, diff, feat_diff)
            if diff > atol:
                raise ExportError(
                    f"{name}: onnxruntime probabilities differ from torch by {diff:.2e} "
                    f"(> {atol:.0e})"
                )
            if k in stages:
                stage_out = stages[k].run(None, {in_name: x.numpy()})[0]
                stage_diff = _max_rel(stage_out, feats.numpy())
                note(f"stage_{k}.onnx", None, stage_diff)
                if stage_diff > 1e-3:
                    raise ExportError(
                        f"stage_{k}.onnx: features differ from torch by {stage_diff:.2e} (relative)"
                    )
            x = feats
        probs = torch.softmax(model.forward_backbone(torch.from_numpy(batch)), dim=-1).numpy()
        ort_probs = full.run(None, {full.get_inputs()[0].name: batch})[0]
        diff = float(np.abs(ort_probs - probs).max())
        note(FULL_MODEL_FILE, diff, None)
        if diff > atol:
            raise ExportError(
                f"{FULL_MODEL_FILE}: onnxruntime probabilities differ from torch by {diff:.2e} "
                f"(> {atol:.0e})"
            )
    return {f: (None if p < 0 else p, None if r < 0 else r) for f, (p, r) in worst.items()}


def verify_single_graph(
    path: Path, model: MultiExitNetwork, inputs: list[np.ndarray], atol: float
) -> float:
    """Worst |onnxruntime − torch| probability of a plain single graph over `inputs`."""
    session = ort_session(path)
    worst = 0.0
    for batch in inputs:
        with torch.no_grad():
            probs = torch.softmax(model.forward_backbone(torch.from_numpy(batch)), dim=-1).numpy()
        ort_probs = session.run(None, {session.get_inputs()[0].name: batch})[0]
        worst = max(worst, float(np.abs(ort_probs - probs).max()))
    if worst > atol:
        raise ExportError(
            f"{path.name}: onnxruntime probabilities differ from torch by {worst:.2e} (> {atol:.0e})"
        )
    return worst


def verify_macs(path: Path, job: GraphJob, rtol: float) -> int:
    onnx_macs = count_onnx_macs(path)
    if relative_difference(onnx_macs, job.torch_macs) > rtol:
        raise ExportError(
            f"{job.file}: ONNX graph counts {onnx_macs} MACs per image but torch counts "
            f"{job.torch_macs} for this part (> {rtol:.0%} apart; by op: {macs_by_op(path)}) — "
            "the graph does not compute exactly this segment"
        )
    return onnx_macs
