"""SFR (seed 002, Hou and Fan): many-to-one feature regularisation with attention weights and
dynamic label smoothing, as a self-distillation loss over the exits.

The paper prints no equations; this is the formulation implemented. For K exits with logits
z_i, the exits' aligned maps M_i (deepest-shaped, N×D×h×w; M_K = the deepest stage's own map,
the "teacher feature"), target y (one-hot rows ŷ), g(M) = global average pool:

    query   q   = W_q · g(M_K)                        (W_q, W_k: learned D×D projections,
    keys    k_i = W_k · g(M_i),   i < K                loss parameters: optimiser + checkpoint)
    weights w_i = softmax_i( ⟨q, k_i⟩ / √D )          (per sample, over the shallow exits)
    L_SFR   = λ · mean_n Σ_{i<K} w_{n,i} · d(M_i[n], M_K[n])

    d = ``l2``:  mean over the map's elements of (M_i − M_K)²
    d = ``emd``: the optimal-transport cost between the sets of h·w position vectors of the two
               maps, cost 1 − cos(u, v), uniform marginals, entropic Sinkhorn (ε = 0.05,
               50 log-domain iterations; `sinkhorn_cost`)

    dynamic label smoothing: with p_{t−1}(n) the deepest exit's softmax on row n in epoch t−1,
    ỹ_n = (1 − ε)·ŷ_n + ε·r_n,   r_{n,k} = p_{t−1,k}(n)·[ŷ_{n,k} = 0] / Σ_{j: ŷ_{n,j}=0} p_{t−1,j}(n)
    (each wrong class gets mass in proportion to its previous score among the wrong classes)

    L = Σ_i CE(z_i, ỹ) + L_SFR

λ = `sfr_weight`, ε = `dls_epsilon`, d = `sfr_distance`.

Readings where the paper is silent (SEED_METHODS.md, 002):
- the paper distils a separate teacher into a student; here the deepest exit is the teacher
  feature and every shallow exit's aligned map (the exit head's, `--head` attention, lite,
  st or ckdf) a student feature (the issue's self-distillation reading); M_K is detached in d
  and in the query, while the keys and the shallow maps carry gradient, so the projections
  learn which exit to weight (as SemCKD's many-to-one attention does);
- projections are bias-free D×D linear maps (the paper names none), scaled dot product;
- EMD: DeepEMD-style 1 − cosine cost with uniform node weights (the paper's node weights are
  unstated); a map of another resolution than M_K is average-pooled to it first;
- dynamic label smoothing's "model at epoch t−1" is read as the predictions the deepest exit
  made on each training row while training in epoch t−1 (train mode, that epoch's augmented
  view): one N_train×C table, no second forward pass. Rows not seen in epoch t−1 (epoch 0,
  or a dropped last batch) keep the hard target. ε = 0.1 (not given). The previous and the
  current epoch's tables are loss state: saved with the checkpoint, resumed bit-exactly (two
  N_train×C float32 tables, 36 MB for CIFAR-100's 45 000 rows). Under DDP every process
  gathers all processes' rows, so the tables agree;
- CE on every exit with ỹ (the deep supervision every multi-exit loss here has); the
  `label_smoothing` option still applies on top; R: `loss_reduction: mean` divides by K.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .inputs import ExitLoss, LossInputs, one_hot_target
from .registry import register_loss
from .self_distillation import LossTerms, check_common

SFR_FIELDS = ("sfr_weight", "sfr_distance", "dls_epsilon")
SFR_DISTANCES = ("l2", "emd")


def sinkhorn_cost(cost: torch.Tensor, eps: float = 0.05, iters: int = 50) -> torch.Tensor:
    """Entropic optimal-transport cost Σ π·C between uniform marginals, batched.

    cost: N×P×Q. Log-domain Sinkhorn iterations; returns N costs (differentiable in `cost`)."""
    n, p, q = cost.shape
    log_a = cost.new_full((n, p), -math.log(p))
    log_b = cost.new_full((n, q), -math.log(q))
    f = cost.new_zeros(n, p)
    g = cost.new_zeros(n, q)
    for _ in range(iters):
        f = eps * (log_a - torch.logsumexp((g[:, None, :] - cost) / eps, dim=2))
        g = eps * (log_b - torch.logsumexp((f[:, :, None] - cost) / eps, dim=1))
    plan = torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)
    return (plan * cost).sum(dim=(1, 2))


def emd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample EMD between two maps' sets of position vectors (1 − cos cost): N values."""
    u = F.normalize(student.flatten(2).transpose(1, 2), dim=2)  # N×P×D
    v = F.normalize(teacher.flatten(2).transpose(1, 2), dim=2)  # N×Q×D
    return sinkhorn_cost(1.0 - u @ v.transpose(1, 2))


def l2_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference over the map's elements: N values."""
    return (student - teacher).pow(2).flatten(1).mean(dim=1)


def dls_target(target: torch.Tensor, previous: torch.Tensor, epsilon: float) -> torch.Tensor:
    """ỹ = (1 − ε)·ŷ + ε·r, r = previous scores on the wrong classes, renormalised.

    target: N×C probability rows; previous: N×C probabilities. A row whose wrong classes
    have no previous mass keeps its target."""
    wrong = previous * (target <= 0)
    mass = wrong.sum(dim=1, keepdim=True)
    spread = wrong / mass.clamp_min(1e-12)
    smoothed = (1 - epsilon) * target + epsilon * spread
    return torch.where(mass > 0, smoothed, target)


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class SFRLoss(ExitLoss):
    """Many-to-one feature regularisation + dynamic label smoothing (module docstring)."""

    def __init__(
        self,
        sfr_weight: float = 1.0,
        sfr_distance: str = "l2",
        dls_epsilon: float = 0.1,
        reduction: str = "sum",
        label_smoothing: float = 0.0,
        num_exits: int | None = None,
        feature_dim: int | None = None,
        num_classes: int | None = None,
        train_rows: int | None = None,
    ) -> None:
        super().__init__()
        check_common(reduction, label_smoothing)
        if sfr_weight < 0:
            raise ValueError(f"sfr_weight must be ≥ 0, got {sfr_weight}")
        if sfr_distance not in SFR_DISTANCES:
            raise ValueError(
                f"unknown sfr_distance {sfr_distance!r}; valid: {', '.join(SFR_DISTANCES)}"
            )
        if not 0.0 <= dls_epsilon < 1.0:
            raise ValueError(f"dls_epsilon must be in [0, 1), got {dls_epsilon}")
        if num_exits is not None and num_exits < 2:
            raise ValueError("sfr regularises shallow exits: it needs at least 2 exits")
        self.weight, self.distance, self.epsilon = sfr_weight, sfr_distance, dls_epsilon
        self.reduction, self.label_smoothing = reduction, label_smoothing
        self.needs = frozenset({"maps", "rows"} if dls_epsilon > 0 else {"maps"})
        self.query: nn.Linear | None = None
        self.key: nn.Linear | None = None
        if feature_dim is not None:  # loss parameters: the engine trains and saves them
            self.query = nn.Linear(feature_dim, feature_dim, bias=False)
            self.key = nn.Linear(feature_dim, feature_dim, bias=False)
        # Dynamic label smoothing tables: the previous epoch's and the current epoch's deepest
        # softmax per training row (loss state, in the checkpoint).
        self.tables = dls_epsilon > 0 and train_rows is not None and num_classes is not None
        self.epoch_now: int | None = None
        if self.tables:
            assert train_rows is not None and num_classes is not None
            self.previous = torch.zeros(train_rows, num_classes)
            self.previous_seen = torch.zeros(train_rows, dtype=torch.bool)
            self.current = torch.zeros(train_rows, num_classes)
            self.current_seen = torch.zeros(train_rows, dtype=torch.bool)

    # -- the feature term ---------------------------------------------------------------
    def attention_weights(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """N×(K−1) weights of the shallow exits, each row a softmax."""
        if self.query is None or self.key is None:
            raise ValueError("sfr was built without feature_dim: no query/key projections")
        deepest = maps[-1].detach()
        q = self.query(deepest.mean(dim=(2, 3)))  # N×D
        keys = torch.stack([self.key(m.mean(dim=(2, 3))) for m in maps[:-1]], dim=1)
        scores = (keys @ q.unsqueeze(2)).squeeze(2) / math.sqrt(q.shape[1])
        return torch.softmax(scores, dim=1)

    def feature_term(self, maps: list[torch.Tensor]) -> torch.Tensor:
        deepest = maps[-1].detach()
        weights = self.attention_weights(maps)
        dist = l2_distance if self.distance == "l2" else emd_distance
        per_exit = []
        for fmap in maps[:-1]:
            if fmap.shape[-2:] != deepest.shape[-2:]:
                fmap = F.adaptive_avg_pool2d(fmap, deepest.shape[-2:])
            per_exit.append(dist(fmap, deepest))
        return (weights * torch.stack(per_exit, dim=1)).sum(dim=1).mean()

    # -- dynamic label smoothing ---------------------------------------------------------
    def _turn_epoch(self, epoch: int) -> None:
        if self.epoch_now == epoch:
            return
        if self.epoch_now is not None:  # epoch t−1's table becomes the teacher of epoch t
            self.previous, self.current = self.current, self.previous
            self.previous_seen, self.current_seen = self.current_seen, self.previous_seen
            self.current.zero_()
            self.current_seen.zero_()
        self.epoch_now = epoch

    def smoothed_target(self, inputs: LossInputs, num_classes: int) -> torch.Tensor:
        target = one_hot_target(inputs.target, num_classes)
        if not self.tables or inputs.rows is None:
            return target
        self._turn_epoch(inputs.epoch)
        rows = inputs.rows.cpu()
        seen = self.previous_seen[rows].to(target.device)
        smoothed = dls_target(target, self.previous[rows].to(target.device), self.epsilon)
        return torch.where(seen[:, None], smoothed, target)

    def record(self, inputs: LossInputs) -> None:
        """Store this batch's deepest softmax for the next epoch's targets."""
        if not self.tables or inputs.rows is None:
            return
        probs = torch.softmax(inputs.logits[-1].detach().float(), dim=1)
        rows = _all_gather(inputs.rows)
        probs = _all_gather(probs)
        self.current[rows.cpu()] = probs.cpu()
        self.current_seen[rows.cpu()] = True

    def forward(self, inputs: LossInputs) -> LossTerms:
        logits = inputs.logits
        if inputs.maps is None:
            raise ValueError("sfr needs the exits' aligned maps")
        target = self.smoothed_target(inputs, logits[-1].shape[1])
        ce = sum(F.cross_entropy(z, target, label_smoothing=self.label_smoothing) for z in logits)
        feat = self.weight * self.feature_term(inputs.maps) if self.weight > 0 else ce * 0
        self.record(inputs)
        zero = logits[0].new_zeros(())
        if self.reduction == "mean":
            ce, feat = ce / len(logits), feat / len(logits)
        return LossTerms(total=ce + feat, ce=ce, kl=zero, feature=feat)

    def get_extra_state(self) -> dict[str, Any]:
        """The label-smoothing tables and the epoch they belong to (bit-exact resume)."""
        if not self.tables:
            return {}
        return {
            "epoch": self.epoch_now,
            "previous": self.previous.clone(),
            "previous_seen": self.previous_seen.clone(),
            "current": self.current.clone(),
            "current_seen": self.current_seen.clone(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not self.tables or not state:
            return
        if tuple(state["previous"].shape) != tuple(self.previous.shape):
            raise ValueError(
                f"sfr label-smoothing tables of shape {tuple(state['previous'].shape)} do not "
                f"fit this run's {tuple(self.previous.shape)}"
            )
        self.epoch_now = state["epoch"]
        for name in ("previous", "previous_seen", "current", "current_seen"):
            setattr(self, name, state[name].cpu().clone())


@register_loss("sfr", fields=SFR_FIELDS, needs=("maps", "rows"))
def sfr(**kwargs: Any) -> nn.Module:
    """Seed 002's SFR + dynamic label smoothing as a multi-exit loss (module docstring)."""
    keys = ("sfr_weight", "sfr_distance", "dls_epsilon", "reduction", "label_smoothing")
    keys += ("num_exits", "feature_dim", "num_classes", "train_rows")
    return SFRLoss(**{k: kwargs[k] for k in keys if k in kwargs})
