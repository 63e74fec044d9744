import math

import pytest
import torch
from torch.nn import functional as F

from training.losses import create_loss, list_losses


def _kl(p_teacher, logits_student, t):
    q = F.softmax(logits_student / t, dim=1)
    return float((p_teacher * (p_teacher.log() - q.log())).sum(1).mean())


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    logits = [torch.randn(4, 5) for _ in range(3)]
    feats = [torch.randn(4, 6) for _ in range(3)]
    target = torch.tensor([0, 1, 2, 3])
    return logits, feats, target


def _expected(logits, feats, target, alpha, lam, t, refs):
    """refs[i] = list of teacher indices for shallow exit i (hand-written per path)."""
    k = len(logits)
    ce = kl = l2 = 0.0
    for i in range(k):
        ce_i = float(F.cross_entropy(logits[i], target))
        if i == k - 1:
            ce += ce_i
            continue
        ce += (1 - alpha) * ce_i
        for teacher_p, teacher_f in refs[i]:
            kl += alpha * t * t * _kl(teacher_p, logits[i], t)
            l2 += float(((feats[i] - teacher_f) ** 2).sum(1).mean())
    return (ce + kl + lam * l2) / k


@pytest.mark.parametrize("path", ["deepest", "transitive", "dense", "ensemble"])
def test_each_distillation_path_matches_hand_computed_value(tiny, path):
    logits, feats, target = tiny
    alpha, lam, t = 0.6, 0.04, 3.0
    soft = [F.softmax(z / t, dim=1) for z in logits]
    ens = (sum(soft) / 3, sum(feats) / 3)
    refs = {
        "deepest": [[(soft[2], feats[2])], [(soft[2], feats[2])]],
        "transitive": [[(soft[1], feats[1])], [(soft[2], feats[2])]],
        "dense": [[(soft[1], feats[1]), (soft[2], feats[2])], [(soft[2], feats[2])]],
        "ensemble": [[ens], [ens]],
    }[path]
    # The paper as printed: mean over exits, T²·KL, squared ℓ2 hint on every shallow exit.
    loss = create_loss(
        "self_distillation",
        path=path,
        alpha=alpha,
        lam=lam,
        temperature=t,
        reduction="mean",
        distill="kl_t2",
        feature="l2",
    )
    got = loss(logits, feats, target)
    assert math.isclose(
        float(got.total), _expected(logits, feats, target, alpha, lam, t, refs), rel_tol=1e-5
    )
    assert math.isclose(float(got.total), float(got.ce + got.kl + got.feature), rel_tol=1e-6)


def test_kl_term_scales_with_t_squared(tiny):
    logits, feats, target = tiny
    terms = {}
    for t in (1.0, 4.0):
        loss = create_loss(
            "self_distillation",
            alpha=1.0,
            lam=0.0,
            temperature=t,
            distill="kl_t2",
            reduction="mean",
        )
        terms[t] = float(loss(logits, feats, target).kl)
        soft = F.softmax(logits[2] / t, dim=1)
        raw = sum(_kl(soft, logits[i], t) for i in range(2)) / 3
        assert math.isclose(terms[t], t * t * raw, rel_tol=1e-5)


def test_teacher_side_is_detached(tiny):
    logits, feats, target = tiny
    logits = [z.clone().requires_grad_(True) for z in logits]
    feats = [f.clone().requires_grad_(True) for f in feats]
    loss = create_loss("self_distillation", alpha=1.0, lam=1.0, feature="l2")
    out = loss(logits, feats, target)
    (out.kl + out.feature).backward()
    # Only the shallow (student) exits receive gradient from the distillation terms.
    assert logits[2].grad is None or float(logits[2].grad.abs().sum()) == 0.0
    assert feats[2].grad is None or float(feats[2].grad.abs().sum()) == 0.0
    assert float(logits[0].grad.abs().sum()) > 0 and float(feats[0].grad.abs().sum()) > 0


def test_zero_alpha_lambda_is_plain_ce_average(tiny):
    logits, feats, target = tiny
    loss = create_loss("self_distillation", reduction="mean", feature="l2", lam=0.04)
    got = loss(logits, feats, target, alpha=0.0, lam=0.0)
    want = sum(float(F.cross_entropy(z, target)) for z in logits) / 3
    assert math.isclose(float(got.total), want, rel_tol=1e-6)


def test_registry_lists_and_rejects():
    assert {"self_distillation", "baseline", "deep_supervision"} <= set(list_losses())
    with pytest.raises(ValueError, match="valid: "):
        create_loss("nope")
    with pytest.raises(ValueError, match="distillation path"):
        create_loss("self_distillation", path="sideways")


# ----------------------------------------------------------------------------- loss options


def _ce(z, y, eps=0.0):
    """Hand-written (label-smoothed) cross-entropy, mean over the batch."""
    logp = torch.log_softmax(z, dim=1)
    k = z.shape[1]
    target = torch.full_like(logp, eps / k)
    target[torch.arange(len(y)), y] += 1 - eps
    return float(-(target * logp).sum(1).mean())


def test_default_is_the_authors_code_sum_soft_ce_no_feature(tiny):
    """CE_K + Σ_i<K [0.7·CE_i + 0.3·softCE_T=3(c_K → c_i)], summed, no T², no hint."""
    logits, feats, target = tiny
    got = create_loss("self_distillation")(logits, feats, target)
    teacher = F.softmax(logits[2] / 3.0, dim=1)
    want = _ce(logits[2], target)
    for i in range(2):
        soft_ce = float(-(teacher * F.log_softmax(logits[i] / 3.0, dim=1)).sum(1).mean())
        want += 0.7 * _ce(logits[i], target) + 0.3 * soft_ce
    assert math.isclose(float(got.total), want, rel_tol=1e-5)
    assert float(got.feature) == 0.0


def test_sum_is_k_times_mean(tiny):
    logits, feats, target = tiny
    kw = {"alpha": 0.6, "lam": 0.04, "feature": "l2", "distill": "kl_t2"}
    summed = float(
        create_loss("self_distillation", reduction="sum", **kw)(logits, feats, target).total
    )
    mean = float(
        create_loss("self_distillation", reduction="mean", **kw)(logits, feats, target).total
    )
    assert math.isclose(summed, 3 * mean, rel_tol=1e-6)


def test_soft_ce_is_kl_plus_teacher_entropy_without_t_squared(tiny):
    logits, feats, target = tiny
    t = 3.0
    soft = create_loss("self_distillation", alpha=1.0, distill="soft_ce", temperature=t)
    kl = create_loss("self_distillation", alpha=1.0, distill="kl_t2", temperature=t)
    p = F.softmax(logits[2] / t, dim=1)
    entropy = float(-(p * p.log()).sum(1).mean())
    got_soft = float(soft(logits, feats, target).kl)
    got_kl = float(kl(logits, feats, target).kl)
    assert math.isclose(got_soft, got_kl / (t * t) + 2 * entropy, rel_tol=1e-5)


def test_label_smoothing_applies_to_every_ce_term(tiny):
    logits, feats, target = tiny
    loss = create_loss("self_distillation", alpha=0.0, label_smoothing=0.1)
    want = sum(_ce(z, target, 0.1) for z in logits)
    assert math.isclose(float(loss(logits, feats, target).total), want, rel_tol=1e-5)
    ds = create_loss("deep_supervision", label_smoothing=0.1)
    assert math.isclose(float(ds(logits, feats, target).total), want, rel_tol=1e-5)
    base = create_loss("baseline", label_smoothing=0.1)
    assert math.isclose(
        float(base(logits[-1:], feats[-1:], target).total),
        _ce(logits[2], target, 0.1),
        rel_tol=1e-5,
    )


def test_deep_supervision_sums_unless_mean(tiny):
    logits, feats, target = tiny
    ces = [_ce(z, target) for z in logits]
    summed = create_loss("deep_supervision")(logits, feats, target)
    mean = create_loss("deep_supervision", reduction="mean")(logits, feats, target)
    assert math.isclose(float(summed.total), sum(ces), rel_tol=1e-6)
    assert math.isclose(float(mean.total), sum(ces) / 3, rel_tol=1e-6)


def test_l2_hint_on_chosen_exits_only(tiny):
    logits, feats, target = tiny
    loss = create_loss(
        "self_distillation", alpha=0.0, lam=0.5, feature="l2", feature_exits=(2,), num_exits=3
    )
    got = float(loss(logits, feats, target).feature)
    want = 0.5 * float(((feats[1] - feats[2]) ** 2).sum(1).mean())  # exit 2 only
    assert math.isclose(got, want, rel_tol=1e-6)


def test_adapter_hint_is_non_squared_distance_through_learned_linear_maps(tiny):
    logits, feats, target = tiny
    loss = create_loss(
        "self_distillation",
        alpha=0.0,
        lam=0.03,
        feature="adapter",
        feature_exits=(1, 2),
        num_exits=3,
        feature_dim=6,
    )
    names = sorted(n for n, _ in loss.named_parameters())
    assert names == ["adapters.1.weight", "adapters.2.weight"]
    with torch.no_grad():
        for k, a in loss.adapters.items():
            a.weight.copy_(torch.eye(6) * (1.0 + int(k)))
    got = float(loss(logits, feats, target).feature.detach())
    want = 0.0
    for i in range(2):
        diff = (feats[i] * (2.0 + i)) - feats[2]
        want += float(diff.pow(2).sum(1).sqrt().mean())
    assert math.isclose(got, 0.03 * want, rel_tol=1e-5)
    # The adapters learn: the hint sends gradient into them, never into the teacher feature.
    f = [x.clone().requires_grad_(True) for x in feats]
    loss(logits, f, target).feature.backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in loss.parameters())
    assert f[2].grad is None or float(f[2].grad.abs().sum()) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"reduction": "avg"}, "loss reduction"),
        ({"distill": "js"}, "distillation term"),
        ({"feature": "cosine"}, "feature hint"),
        ({"alpha": -0.1}, "alpha"),
        ({"lam": -1.0}, "lambda"),
        ({"temperature": 0.0}, "temperature"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"feature": "l2", "feature_exits": (3,), "num_exits": 3}, "shallow exits"),
        ({"feature_exits": (1,)}, "needs a feature hint"),
        ({"feature": "adapter"}, "needs num_exits"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        create_loss("self_distillation", **kwargs)
