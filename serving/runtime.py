"""The early-exit runtime: a bundle's ONNX segments chained in onnxruntime (no torch).

`classify` runs segment 1 on the whole batch, answers the rows whose max probability beats
t_1, runs segment 2 only on the rows left, and so on. The decision rule is exactly
`core.decision.decide` (float64 comparison, strict `>`, first accepting exit answers, a
row no exit accepts gets the fallback, reported as exit 0), so the answers equal what the
thresholds evaluator computes from calibration arrays.

Disabled exits (t_k ≥ 1.0) run `stage_k.onnx` (no head) when the bundle has one and the
skipped head's probabilities cannot matter: they never answer a row themselves, and they are
needed only by the "ensemble" fallback. So stage files are used when fallback == "last", or when
no row can fall back at all (t_K < 1/C: exit K's max probability is at least 1/C, so it accepts
every row reaching it). Otherwise every segment runs with its head and the ensemble is the
mean over ALL K exits' probabilities, exactly as in `decide`.

With fallback "plain" a row no exit accepts is answered by the plain graph (`core.bundle.
plain_graph`) run on that row's input, and the chain stops after the last enabled exit
(`core.decision.chain_segments`): later segments would compute nothing anyone reads. The plain
graph's run time is `BatchResult.plain_seconds`, outside the per-segment lists.

On CUDA, feature maps stay on the device between segments (IOBinding); only probabilities are
copied to the host. When only some rows continue, a tiny ONNX Gather graph selects them on the
device, so features are never copied to the host.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import (
    BundleError,
    InputSpec,
    Manifest,
    PlainGraph,
    load_manifest,
    plain_graph,
    read_thresholds,
    validate_threshold_values,
)
from core.decision import (
    FALLBACK_EXIT,
    accept_mask,
    accepts_row,
    can_fall_back,
    chain_segments,
    decide,
    skipped_heads,
)
from core.normalize import normalize_images
from serving.providers import normalize_providers

logger = logging.getLogger(__name__)

# A serialized ONNX model (opset 13) computing rows = Gather(data, indices, axis=0) for float32
# `data` of any rank: it selects the continuing rows of a feature map on the CUDA device.
# Built with onnx.helper (see tests/test_runtime_gather.py, which rebuilds and compares it) and
# stored as bytes because the serving install has onnxruntime but not the onnx package.
_GATHER_ROWS_MODEL = bytes.fromhex(
    "080812096561726c79657869743a6d0a2a0a04646174610a07696e64696365731204726f777322064761746865"
    "722a0b0a04617869731800a00102120b6761746865725f726f77735a0c0a046461746112040a0208015a160a07"
    "696e6469636573120b0a09080712050a0312016e620c0a04726f777312040a02080142040a00100d"
)


class ProviderUnavailableError(RuntimeError):
    """A requested execution provider cannot run here and `strict` forbids falling back."""


@dataclass(frozen=True)
class BatchResult:
    """One classified batch; row i of every array is input row i. Treat the arrays as read-only:
    a batch of one shares its `exits` array with other answers at the same exit."""

    probs: np.ndarray  # N×C float32: the answering exit's (or the fallback's) probabilities
    exits: np.ndarray  # N int64: answering exit 1..K, 0 = fallback
    exit_probs: np.ndarray | None  # N×K×C float32, full mode only
    rows_per_segment: list[int]  # rows that entered segment k (0 when none reached it)
    segment_seconds: list[float]  # wall-clock seconds spent running segment k
    plain_seconds: float = 0.0  # fallback "plain": seconds in the plain graph (0 when unused)
    plain_probs: np.ndarray | None = None  # N×C: the plain graph's, full mode + fallback "plain"

    @property
    def labels(self) -> np.ndarray:
        """Predicted class index per row."""
        labels: np.ndarray = self.probs.argmax(axis=1)
        return labels

    @property
    def confidences(self) -> np.ndarray:
        confidences: np.ndarray = self.probs.max(axis=1)
        return confidences


def provider_list(providers: str | Sequence[str]) -> list[str]:
    out = normalize_providers(providers)
    if not out:
        raise ValueError("no execution provider given")
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")  # ops a GPU provider lacks still need a home
    return out


class EarlyExitRuntime:
    """Chained-segment inference over a bundle directory.

    Raises BundleError for a missing, malformed or corrupted bundle (the message names the
    file), ValueError for bad arguments, ProviderUnavailableError when `strict` and CUDA was
    asked for but cannot run. Thread-safe: sessions are shared, thresholds are swapped as one
    tuple reference.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        providers: Sequence[str] = ("cpu",),
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        strict: bool = False,
        verify: bool = True,
        allow_spinning: bool | None = None,
        use_stage_files: bool = True,
        device_chain: bool = False,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = load_manifest(self.bundle_dir, verify=verify)
        stored = read_thresholds(self.bundle_dir, self.manifest.num_exits)
        self._thresholds: tuple[float, ...] = stored.values
        self.tuned: dict[str, Any] = dict(stored.tuned)
        self._lock = threading.Lock()
        self._plans: dict[tuple[float, ...], tuple[list[bool], bool, int]] = {}
        self._input_shape = tuple(self.manifest.input.shape)
        # Batch-1 answers share these read-only exit arrays: building one is a cold numpy call
        # on the latency path.
        self._single_exits = [
            _read_only(np.array([k], dtype=np.int64)) for k in range(self.manifest.num_exits + 1)
        ]
        self._options = session_options(ort, intra_op_threads, inter_op_threads, allow_spinning)
        self.providers = resolve_providers(ort, self._options, provider_list(providers), strict)
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        # Where feature maps live between segments on the device-resident path (IOBinding +
        # Gather graph): the GPU under CUDA. `device_chain` runs that same path on the CPU, so
        # its bookkeeping is exercised (tests) on machines without a GPU.
        self._device: tuple[str, int] | None = (
            ("cuda", 0) if self.on_cuda else ("cpu", 0) if device_chain else None
        )

        m = self.manifest
        self._segments = [self._open(spec.file) for spec in m.segments]
        self._stages: list[Any | None] = [
            self._open(spec.stage_file) if spec.stage_file and use_stage_files else None
            for spec in m.segments
        ]
        self._full = self._open(m.full_model.file)
        self._check_chain()
        # Fallback "plain": the graph that answers the rows no exit accepts, and its tensors.
        self._plain: Any | None = None
        self._plain_io = ("", "")
        if m.fallback == "plain":
            graph = plain_graph(m)
            self._plain = self._full if graph.file == m.full_model.file else self._open(graph.file)
            self._plain_io = plain_io_names(self._plain, m, graph)
        # Output names per segment, built once: probabilities first, then features if any.
        self._outputs = [
            [spec.probs_output] + ([spec.feature_output] if spec.feature_output else [])
            for spec in m.segments
        ]
        self._gather = self._open_gather() if self._device else None
        logger.info(
            "loaded bundle %s %s: %d exits on %s, thresholds %s",
            m.name,
            m.version,
            m.num_exits,
            self.providers[0],
            list(self._thresholds),
        )

    # ------------------------------------------------------------------------- setup

    def _open(self, file: str) -> Any:
        return open_session(self._ort, self.bundle_dir, file, self._options, self.providers)

    def _open_gather(self) -> Any:
        return self._ort.InferenceSession(
            _GATHER_ROWS_MODEL, self._options, providers=self.providers
        )

    def _check_io(
        self,
        session: Any,
        file: str,
        input_name: str,
        input_shape: Sequence[int],
        outputs: dict[str, Sequence[int]],
    ) -> None:
        check_io(session, file, input_name, input_shape, outputs)

    def _check_chain(self) -> None:
        m = self.manifest
        num_classes = m.num_classes
        for spec, session, stage in zip(m.segments, self._segments, self._stages, strict=True):
            outputs: dict[str, Sequence[int]] = {spec.probs_output: (num_classes,)}
            if spec.feature_output:
                outputs[spec.feature_output] = spec.feature_shape or ()
            self._check_io(session, spec.file, spec.input_name, spec.input_shape, outputs)
            if stage is not None:
                if not spec.feature_output:
                    raise BundleError(
                        f"{spec.stage_file}: the last segment cannot have a stage file"
                    )
                self._check_io(
                    stage,
                    str(spec.stage_file),
                    spec.input_name,
                    spec.input_shape,
                    {spec.feature_output: spec.feature_shape or ()},
                )
        full = m.full_model
        self._check_io(
            self._full,
            full.file,
            full.input_name,
            m.input.shape,
            {full.probs_output: (num_classes,)},
        )

    # ------------------------------------------------------------------------- thresholds

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self._thresholds

    def set_thresholds(self, values: Sequence[float], tuned: dict[str, Any] | None = None) -> None:
        """Validate and swap in new thresholds; a running `classify` keeps the ones it read."""
        checked = validate_threshold_values(values, self.manifest.num_exits)
        with self._lock:
            self._thresholds = checked
            if tuned is not None:
                self.tuned = dict(tuned)

    def can_fall_back(self, thresholds: Sequence[float]) -> bool:
        """False when exit K accepts every row reaching it (`core.decision.can_fall_back`)."""
        return bool(can_fall_back(thresholds, self.manifest.num_classes))

    def _plan(self, thresholds: tuple[float, ...]) -> tuple[list[bool], bool, int]:
        """(stage_skips, keep every exit's probabilities for the ensemble, segments a row runs
        before falling back), cached per vector: a serving process sees one or two threshold
        vectors, and batch-1 latency is short."""
        plan = self._plans.get(thresholds)
        if plan is None:
            m = self.manifest
            keep_all = m.fallback == "ensemble" and self.can_fall_back(thresholds)
            stop = int(chain_segments(thresholds, m.fallback))
            plan = (self.stage_skips(thresholds), keep_all, stop)
            if len(self._plans) < 64:
                self._plans[thresholds] = plan
        return plan

    def sessions(self, stage_files: bool = False) -> list[Any | None]:
        """The onnxruntime session of every segment (or of its stage file, None where there is
        none), for diagnostics that time bare `session.run` calls against `classify` on the
        same sessions and weights."""
        return list(self._stages if stage_files else self._segments)

    def stage_skips(self, thresholds: Sequence[float] | None = None) -> list[bool]:
        """Which segments `classify` runs as their stage file (no head) under `thresholds`."""
        th = self._thresholds if thresholds is None else tuple(thresholds)
        m = self.manifest
        skipped = skipped_heads(th, m.fallback, m.num_classes).tolist()
        return [bool(skip) and self._stages[k] is not None for k, skip in enumerate(skipped)]

    # ------------------------------------------------------------------------- inputs

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×C (or N×H×W for one channel) → normalised float32 N×C×H×W."""
        return preprocess_images(self.manifest.input, images)

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        expected = self._input_shape
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"batch must be N×{'×'.join(map(str, expected))} float32, got {list(x.shape)}"
            )
        return x

    def warm_up(self, max_batch_size: int) -> list[int]:
        """Run every segment (heads and stage files) on zeros at batch sizes 1, 2, 4, … and
        `max_batch_size`: onnxruntime sizes its memory arenas and picks kernels for those
        shapes now, so the first requests are not the slow ones and memory under traffic stays
        flat (a server warms up before it reports ready). Returns the sizes run."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        sizes = sorted(
            {min(1 << i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)}
        )
        k = self.manifest.num_exits
        for n in sizes:
            x = np.zeros((n, *self.manifest.input.shape), dtype=np.float32)
            self.classify(x, full=True)  # every segment with its head, on every row
            self.classify(x, thresholds=(1.0,) * (k - 1) + (0.0,))  # stage files, if any
        return sizes

    # ------------------------------------------------------------------------- inference

    def run_plain(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """Fallback "plain": the plain graph's N×C probabilities for these rows, and seconds."""
        if self._plain is None:
            raise RuntimeError("this bundle's fallback is not 'plain'")
        start = time.perf_counter()
        input_name, output = self._plain_io
        probs: np.ndarray = self._plain.run([output], {input_name: x})[0]
        return probs, time.perf_counter() - start

    def run_full_model(self, batch: np.ndarray) -> np.ndarray:
        """The plain single-graph model (no exits): N×C probabilities."""
        x = self._check_batch(batch)
        full = self.manifest.full_model
        probs: np.ndarray = self._full.run([full.probs_output], {full.input_name: x})[0]
        return probs

    def classify(
        self,
        batch: np.ndarray,
        full: bool = False,
        thresholds: Sequence[float] | None = None,
    ) -> BatchResult:
        """Classify a float32 N×C×H×W batch (see the module docstring for the rule).

        `full=True` runs every segment on every row and also returns `exit_probs`.
        `thresholds` overrides the runtime's own for this call only (benchmarks, what-ifs).
        """
        x = self._check_batch(batch)
        if thresholds is None:
            thresholds = self._thresholds  # one read: a concurrent swap cannot mix two vectors
        else:
            thresholds = validate_threshold_values(list(thresholds), self.manifest.num_exits)
        if full:
            return self._classify_full(x, thresholds)
        if x.shape[0] == 1 and self._device is None:
            return self._classify_one(x, thresholds)
        return self._classify_rows(x, thresholds)

    def _classify_full(self, x: np.ndarray, thresholds: tuple[float, ...]) -> BatchResult:
        m = self.manifest
        n = x.shape[0]
        exit_probs = np.empty((n, m.num_exits, m.num_classes), dtype=np.float32)
        seconds = []
        feats = x
        for k, (spec, session) in enumerate(zip(m.segments, self._segments, strict=True)):
            start = time.perf_counter()
            outputs = session.run(self._outputs[k], {spec.input_name: feats}) if n else None
            seconds.append(time.perf_counter() - start)
            if outputs is not None:
                exit_probs[:, k] = outputs[0]
                if spec.feature_output:
                    feats = outputs[1]
        plain, plain_seconds = self.run_plain(x) if self._plain is not None and n else (None, 0.0)
        answers, exits = decide(exit_probs, thresholds, m.fallback, plain)
        return BatchResult(
            answers, exits, exit_probs, [n] * m.num_exits, seconds, plain_seconds, plain
        )

    def _new_outputs(
        self, n: int, keep_all: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Answer probabilities, exit indices (fallback until an exit accepts) and, when the
        ensemble fallback may be needed, room for every exit's probabilities of every row."""
        m = self.manifest
        seen = np.empty((n, m.num_exits, m.num_classes), np.float32) if keep_all else None
        answers = np.empty((n, m.num_classes), dtype=np.float32)
        return answers, np.full(n, FALLBACK_EXIT, dtype=np.int64), seen

    @staticmethod
    def _accept(
        k: int,
        probs: np.ndarray,
        rows: np.ndarray,
        thresholds: tuple[float, ...],
        answers: np.ndarray,
        exits: np.ndarray,
        seen: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Answer the rows exit k+1 accepts. Returns the rows still running, their
        probabilities, and the mask that selects them (None when every row continues)."""
        if seen is not None:
            seen[rows, k] = probs
        take = accept_mask(probs.max(axis=1), thresholds[k])
        if not take.any():
            return rows, probs, None
        answers[rows[take]] = probs[take]
        exits[rows[take]] = k + 1
        stay = ~take
        return rows[stay], probs[stay], stay

    def _classify_rows(self, x: np.ndarray, thresholds: tuple[float, ...]) -> BatchResult:
        """The batch loop of both paths: host arrays (CPU) or device-resident features
        (`_device`: IOBinding + Gather graph); they differ only in the step and in `_keep`."""
        m = self.manifest
        n = x.shape[0]
        device = self._device
        skips, keep_all, stop = self._plan(thresholds)
        answers, exits, seen = self._new_outputs(n, keep_all)
        rows = np.arange(n)
        rows_per_segment: list[int] = []
        seconds: list[float] = []
        feats: Any = x
        if device is not None and n:
            feats = self._ort.OrtValue.ortvalue_from_numpy(x, *device)
        last_probs = None
        for k in range(m.num_exits):
            if k >= stop:  # fallback "plain" after the last enabled exit: nothing left to run
                rows_per_segment.append(0)
                seconds.append(0.0)
                continue
            rows_per_segment.append(int(rows.size))
            if rows.size == 0:
                seconds.append(0.0)
                continue
            probs, next_feats = (
                self._step_on_device(k, feats, skips[k], seconds, device)
                if device is not None
                else self._step_on_host(k, feats, skips[k], seconds)
            )
            if probs is None:  # a stage file: no head, every row continues
                feats = next_feats
                continue
            rows, probs, stay = self._accept(k, probs, rows, thresholds, answers, exits, seen)
            if next_feats is not None and rows.size:
                feats = next_feats if stay is None else self._keep(next_feats, stay, device)
            last_probs = probs
        plain_seconds = self._fallback(answers, rows, seen, last_probs, x)
        return BatchResult(answers, exits, None, rows_per_segment, seconds, plain_seconds)

    def _step_on_host(
        self, k: int, feats: np.ndarray, skip: bool, seconds: list[float]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(probabilities or None for a stage file, next features or None after the last)."""
        outputs = self._run_segment(k, feats, skip, seconds)
        if skip:
            return None, outputs[0]
        return outputs[0], outputs[1] if len(outputs) > 1 else None

    def _step_on_device(
        self, k: int, feats: Any, skip: bool, seconds: list[float], device: tuple[str, int]
    ) -> tuple[np.ndarray | None, Any]:
        """As `_step_on_host` with features as device OrtValues; probabilities come to the
        host."""
        spec = self.manifest.segments[k]
        session = self._session(k, skip)
        binding = session.io_binding()
        binding.bind_ortvalue_input(spec.input_name, feats)
        if not skip:
            binding.bind_output(spec.probs_output, "cpu")
        if spec.feature_output:
            binding.bind_output(spec.feature_output, *device)
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        seconds.append(time.perf_counter() - start)
        if skip:
            return None, outputs[0]
        return outputs[0].numpy(), outputs[1] if spec.feature_output else None

    def _keep(self, feats: Any, stay: np.ndarray, device: tuple[str, int] | None) -> Any:
        """The feature rows of the rows that continue (a copy on the host, a Gather on the
        device, so feature maps never visit the host)."""
        gather = self._gather  # opened exactly when there is a device
        if device is None or gather is None:
            return feats[stay]
        binding = gather.io_binding()
        binding.bind_ortvalue_input("data", feats)
        binding.bind_cpu_input("indices", np.flatnonzero(stay).astype(np.int64))
        binding.bind_output("rows", *device)
        gather.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _run_segment(
        self, k: int, feats: np.ndarray, skip: bool, seconds: list[float]
    ) -> list[np.ndarray]:
        """Segment k+1 on host features: [probs, features] (features only when `skip`, which
        runs the stage file without its head). Appends the wall time to `seconds`."""
        spec = self.manifest.segments[k]
        session = self._session(k, skip)
        names = [spec.feature_output] if skip else self._outputs[k]
        start = time.perf_counter()
        outputs: list[np.ndarray] = session.run(names, {spec.input_name: feats})
        seconds.append(time.perf_counter() - start)
        return outputs

    def _session(self, k: int, skip: bool) -> Any:
        """Segment k+1's session, or its stage file's (no head) when `skip`."""
        if not skip:
            return self._segments[k]
        stage = self._stages[k]
        if stage is None:  # stage_skips skips only segments that have a stage file
            raise RuntimeError(f"segment {k + 1} has no stage file to run without its head")
        return stage

    def _classify_one(self, x: np.ndarray, thresholds: tuple[float, ...]) -> BatchResult:
        """`_classify_rows` on the host for a single row, the latency-critical case: the same
        decisions and arithmetic, without the row bookkeeping whose numpy calls cost about as
        much as a small segment's head at batch 1. The row's probabilities are read as Python
        floats (`tolist`, exact for float32) and decided by `accepts_row`, `accept_mask`'s float64
        comparison (a NaN accepts nothing in both). Python's
        max over a short list also costs a third of what a numpy reduction does right after
        onnxruntime has run (≈ 3 against ≈ 6 µs a segment, measured in the chain)."""
        m = self.manifest
        skips, keep_all, stop = self._plan(thresholds)
        seen: list[np.ndarray] = []
        seconds: list[float] = []
        feats = x
        probs = None
        for k, spec in enumerate(m.segments):
            if k >= stop:  # fallback "plain": no enabled exit after this one
                break
            outputs = self._run_segment(k, feats, skips[k], seconds)
            if skips[k]:
                feats = outputs[0]
                continue
            probs = outputs[0]
            if keep_all:
                seen.append(probs)
            values = probs[0].tolist()  # probs is 1×C
            if accepts_row(values, thresholds[k]):
                rest = m.num_exits - k - 1
                exits = self._single_exits[k + 1]
                return BatchResult(
                    probs, exits, None, [1] * (k + 1) + [0] * rest, seconds + [0.0] * rest
                )
            if spec.feature_output:
                feats = outputs[1]
        # No exit accepted the row: the batch path's fallback, on a batch of one.
        answers, exits, _ = self._new_outputs(1, keep_all=False)
        stacked = np.stack(seen, axis=1) if keep_all else None
        plain_seconds = self._fallback(answers, np.arange(1), stacked, probs, x)
        ran = len(seconds)
        return BatchResult(
            answers,
            exits,
            None,
            [1] * ran + [0] * (m.num_exits - ran),
            seconds + [0.0] * (m.num_exits - ran),
            plain_seconds,
        )

    def _fallback(
        self,
        answers: np.ndarray,
        rows: np.ndarray,
        seen: np.ndarray | None,
        last_probs: np.ndarray | None,
        x: np.ndarray,
    ) -> float:
        """Answer the rows no exit accepted (the same arithmetic as `decide`); returns the
        seconds the plain graph ran (fallback "plain"), else 0."""
        if rows.size == 0:
            return 0.0
        if self._plain is not None:
            probs, seconds = self.run_plain(x if rows.size == x.shape[0] else x[rows])
            answers[rows] = probs
            return seconds
        if self.manifest.fallback == "ensemble":
            if seen is None:
                # Heads are skipped only when exit K accepts every row; a row falling back here
                # means exit K produced non-finite probabilities.
                raise RuntimeError("exit K rejected a row it must accept: non-finite output?")
            answers[rows] = seen[rows].mean(axis=1)
        else:
            answers[rows] = last_probs
        return 0.0


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _check_shape(file: str, name: str, actual: Sequence[Any], expected: Sequence[int]) -> None:
    """`actual` is onnxruntime's shape: a dynamic batch axis, then the manifest's dimensions."""
    dims = list(actual)
    if len(dims) != len(expected) + 1:
        raise BundleError(
            f"{file}: '{name}' has rank {len(dims)}, expected batch + {list(expected)}"
        )
    if isinstance(dims[0], int):
        raise BundleError(f"{file}: '{name}' has a fixed batch axis ({dims[0]}), not a dynamic one")
    for got, want in zip(dims[1:], expected, strict=True):
        if isinstance(got, int) and got != want:
            raise BundleError(
                f"{file}: '{name}' has shape {dims[1:]}, the manifest says {list(expected)}"
            )


# ----------------------------------------------------------------------------- shared helpers
# Used by EarlyExitRuntime and by serving.plain_runtime.PlainModelRuntime (the plain single
# graph served with --full-model), so both open, check and feed their graphs the same way.


# The tensor names export gives every single graph; the manifest's baseline block names none.
PLAIN_INPUT = "input"
PLAIN_OUTPUT = "probs"


def plain_io_names(session: Any, manifest: Manifest, graph: PlainGraph) -> tuple[str, str]:
    """(input, probabilities output) of a bundle's plain graph, checked against the manifest's
    input shape and class count."""
    if graph.source == "full_model":
        input_name, output = manifest.full_model.input_name, manifest.full_model.probs_output
    else:
        # The baseline block names no tensors: take the graph's only input, and the output
        # export names "probs" (or the only output of a graph written otherwise).
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        input_name = inputs[0] if len(inputs) == 1 else PLAIN_INPUT
        output = outputs[0] if len(outputs) == 1 else PLAIN_OUTPUT
    check_io(
        session, graph.file, input_name, manifest.input.shape, {output: (manifest.num_classes,)}
    )
    return input_name, output


def session_options(ort: Any, intra: int, inter: int, allow_spinning: bool | None) -> Any:
    """onnxruntime session options of every graph a runtime opens."""
    if intra < 0 or inter < 0:
        raise ValueError("thread counts must be >= 0 (0 = onnxruntime default)")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter
    options.log_severity_level = 3
    if allow_spinning is not None:
        flag = "1" if allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", flag)
        options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return options


def resolve_providers(ort: Any, options: Any, wanted: list[str], strict: bool) -> list[str]:
    """Drop CUDA (one warning) when it cannot run here; raise ProviderUnavailableError instead
    when strict."""
    if "CUDAExecutionProvider" not in wanted:
        return wanted
    reason = None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDA provider"
    else:
        # onnxruntime-gpu lists CUDA even without a GPU or CUDA libraries and then silently
        # uses CPU: create one real session to find out. Its own error log would repeat our
        # warning, so it is muted (and restored to onnxruntime's default, warning) meanwhile.
        ort.set_default_logger_severity(4)
        try:
            probe = ort.InferenceSession(
                _GATHER_ROWS_MODEL, options, providers=wanted
            ).get_providers()
        except Exception as exc:  # any provider initialisation failure
            probe, reason = [], f"CUDA session creation failed ({exc})"
        finally:
            ort.set_default_logger_severity(2)
        if probe and probe[0] != "CUDAExecutionProvider":
            reason = "CUDA is not usable on this machine (no GPU or CUDA/cuDNN libraries)"
    if reason is None:
        return wanted
    if strict:
        raise ProviderUnavailableError(f"CUDA execution provider requested but {reason}")
    logger.warning("CUDA execution provider requested but %s; falling back to CPU", reason)
    return ["CPUExecutionProvider"]


def open_session(
    ort: Any, bundle_dir: Path, file: str, options: Any, providers: Sequence[str]
) -> Any:
    """An onnxruntime session of a bundle file; BundleError when it is missing or unloadable."""
    path = bundle_dir / file
    if not path.is_file():
        raise BundleError(f"bundle file missing: {file}")
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types for bad models
        raise BundleError(f"{file}: onnxruntime cannot load it ({exc})") from exc


def check_io(
    session: Any,
    file: str,
    input_name: str,
    input_shape: Sequence[int],
    outputs: dict[str, Sequence[int]],
) -> None:
    """The graph has the one input and the outputs (batch axis + shape) the manifest says."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != input_name:
        raise BundleError(
            f"{file}: inputs {[i.name for i in inputs]} but the manifest says [{input_name!r}]"
        )
    _check_shape(file, inputs[0].name, inputs[0].shape, input_shape)
    got = {o.name: o for o in session.get_outputs()}
    for name, shape in outputs.items():
        if name not in got:
            raise BundleError(f"{file}: no output {name!r} (has {sorted(got)})")
        _check_shape(file, name, got[name].shape, shape)


def preprocess_images(spec: InputSpec, images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×C (or N×H×W for one channel) → normalised float32 N×C×H×W."""
    c, h, w = spec.shape
    arr = np.asarray(images)
    if arr.ndim == 3 and c == 1:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[1:] != (h, w, c):
        raise ValueError(f"images must be N×{h}×{w}×{c} uint8, got shape {list(arr.shape)}")
    return normalize_images(arr, spec.mean, spec.std)
