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
    loss = create_loss("self_distillation", path=path, alpha=alpha, lam=lam, temperature=t)
    got = loss(logits, feats, target)
    assert math.isclose(
        float(got.total), _expected(logits, feats, target, alpha, lam, t, refs), rel_tol=1e-5
    )
    assert math.isclose(float(got.total), float(got.ce + got.kl + got.feature), rel_tol=1e-6)


def test_kl_term_scales_with_t_squared(tiny):
    logits, feats, target = tiny
    terms = {}
    for t in (1.0, 4.0):
        loss = create_loss("self_distillation", alpha=1.0, lam=0.0, temperature=t)
        terms[t] = float(loss(logits, feats, target).kl)
        soft = F.softmax(logits[2] / t, dim=1)
        raw = sum(_kl(soft, logits[i], t) for i in range(2)) / 3
        assert math.isclose(terms[t], t * t * raw, rel_tol=1e-5)


def test_teacher_side_is_detached(tiny):
    logits, feats, target = tiny
    logits = [z.clone().requires_grad_(True) for z in logits]
    feats = [f.clone().requires_grad_(True) for f in feats]
    loss = create_loss("self_distillation", alpha=1.0, lam=1.0)
    out = loss(logits, feats, target)
    (out.kl + out.feature).backward()
    # Only the shallow (student) exits receive gradient from the distillation terms.
    assert logits[2].grad is None or float(logits[2].grad.abs().sum()) == 0.0
    assert feats[2].grad is None or float(feats[2].grad.abs().sum()) == 0.0
    assert float(logits[0].grad.abs().sum()) > 0 and float(feats[0].grad.abs().sum()) > 0


def test_zero_alpha_lambda_is_plain_ce_average(tiny):
    logits, feats, target = tiny
    loss = create_loss("self_distillation")
    got = loss(logits, feats, target, alpha=0.0, lam=0.0)
    want = sum(float(F.cross_entropy(z, target)) for z in logits) / 3
    assert math.isclose(float(got.total), want, rel_tol=1e-6)


def test_registry_lists_and_rejects():
    assert {"self_distillation", "baseline", "deep_supervision"} <= set(list_losses())
    with pytest.raises(ValueError, match="valid: "):
        create_loss("nope")
    with pytest.raises(ValueError, match="distillation path"):
        create_loss("self_distillation", path="sideways")
