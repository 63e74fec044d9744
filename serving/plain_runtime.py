"""The plain single-graph model, served through the same server (`earlyexit-serve --full-model`).

HTTP comparisons of early exit are made against this runtime: the model users would deploy
otherwise (the bundle's `baseline.onnx` when the manifest's `baseline` block names a file, else
`full_model.onnx`; see `core.bundle.plain_graph`), behind the same routes, batching,
decoding, limits and metrics as the early-exit chain. It has no exits and no thresholds: every
row is answered by the one graph, reported as exit `FULL_EXIT` ("full" in answers and metrics),
and its run time is the one segment of `BatchResult`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import Manifest, PlainGraph, load_manifest, plain_graph
from serving.metrics import FULL_EXIT
from serving.runtime import (
    PLAIN_INPUT,
    PLAIN_OUTPUT,
    BatchResult,
    open_session,
    plain_io_names,
    preprocess_images,
    provider_list,
    resolve_providers,
    session_options,
)

logger = logging.getLogger(__name__)

__all__ = ["PLAIN_INPUT", "PLAIN_OUTPUT", "PlainModelRuntime"]


class PlainModelRuntime:
    """One onnxruntime session over a bundle's plain graph, with the interface the server's
    batcher and routes use (`preprocess`, `classify`, `warm_up`, `thresholds`, `manifest`).

    The bundle is loaded and verified as for `EarlyExitRuntime` (every file's sha256, the served
    graph's included); BundleError for a missing, corrupted or mismatched graph,
    ProviderUnavailableError when `strict` and CUDA cannot run.
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
    ) -> None:
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = load_manifest(self.bundle_dir, verify=verify)
        self.graph: PlainGraph = plain_graph(self.manifest)
        self.tuned: dict[str, Any] = {}
        self._options = session_options(ort, intra_op_threads, inter_op_threads, allow_spinning)
        self.providers = resolve_providers(ort, self._options, provider_list(providers), strict)
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self._session = open_session(
            ort, self.bundle_dir, self.graph.file, self._options, self.providers
        )
        self._input_name, self._output_name = plain_io_names(
            self._session, self.manifest, self.graph
        )
        self._input_shape = tuple(self.manifest.input.shape)
        exits = np.array([FULL_EXIT], dtype=np.int64)
        exits.flags.writeable = False
        self._single_exit = exits  # shared by batch-1 answers, like EarlyExitRuntime's
        logger.info(
            "loaded the plain model of bundle %s %s: %s (%s) on %s",
            self.manifest.name,
            self.manifest.version,
            self.graph.file,
            self.graph.source,
            self.providers[0],
        )

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Always empty: the plain model has no exits to threshold."""
        return ()

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×C (or N×H×W for one channel) → normalised float32 N×C×H×W, exactly as
        the early-exit runtime does."""
        return preprocess_images(self.manifest.input, images)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """N×C probabilities of the plain graph for a float32 N×C×H×W batch."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self._input_shape:
            raise ValueError(
                f"batch must be N×{'×'.join(map(str, self._input_shape))} float32, "
                f"got {list(x.shape)}"
            )
        if x.shape[0] == 0:
            return np.empty((0, self.manifest.num_classes), dtype=np.float32)
        probs: np.ndarray = self._session.run([self._output_name], {self._input_name: x})[0]
        return probs

    def classify(
        self, batch: np.ndarray, full: bool = False, thresholds: Sequence[float] | None = None
    ) -> BatchResult:
        """Every row answered by the plain graph (exit `FULL_EXIT`). `full` adds `exit_probs`
        with no exits (N×0×C); `thresholds` is accepted for the early-exit runtime's signature
        and must be empty or None: there is nothing to threshold."""
        if thresholds:
            raise ValueError("the plain model has no exits: thresholds do not apply")
        start = time.perf_counter()
        probs = self.run(batch)
        seconds = time.perf_counter() - start
        n = probs.shape[0]
        exits = self._single_exit if n == 1 else np.full(n, FULL_EXIT, dtype=np.int64)
        exit_probs = np.empty((n, 0, probs.shape[1]), dtype=np.float32) if full else None
        return BatchResult(probs, exits, exit_probs, [n], [seconds])

    def warm_up(self, max_batch_size: int) -> list[int]:
        """Run the graph on zeros at batch sizes 1, 2, 4, … and `max_batch_size` (why: see
        `EarlyExitRuntime.warm_up`). Returns the sizes run."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        sizes = sorted(
            {min(1 << i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)}
        )
        for n in sizes:
            self.run(np.zeros((n, *self._input_shape), dtype=np.float32))
        return sizes

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/model` says about the served graph."""
        return {
            "file": self.graph.file,
            "sha256": self.graph.sha256,
            "source": self.graph.source,
            "macs": self.graph.macs,
        }
