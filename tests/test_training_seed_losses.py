"""Seed methods with teachers and loss state (issue #17): the loss-input interface, the
teacher slot, KD + SD, DRG / DSR, CKDF, SFR; hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from training.losses import LossInputs, TeacherOutputs, create_loss, loss_needs
from training.losses.ckdf import attention_map
from training.losses.drg import ranked
from training.losses.sfr import dls_target, emd_distance, sinkhorn_cost


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _softmax(z: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _ce(z: list[float], label: int) -> float:
    return -math.log(_softmax(z)[label])


# ----------------------------------------------------------------------------- interface


def test_losses_declare_what_they_need():
    assert loss_needs("self_distillation") == frozenset()
    assert loss_needs("resnet_kl") == {"maps"}
    assert loss_needs("kd_self_distillation") == {"teacher"}
    assert loss_needs("drg") == frozenset() and loss_needs("dsr") == frozenset()


def test_short_call_and_inputs_object_agree():
    torch.manual_seed(0)
    logits = [torch.randn(3, 4) for _ in range(2)]
    feats = [torch.randn(3, 5) for _ in range(2)]
    y = torch.tensor([0, 1, 3])
    loss = create_loss("self_distillation", alpha=0.5)
    assert torch.equal(loss(logits, feats, y).total, loss(LossInputs(logits, feats, y)).total)


# ----------------------------------------------------------------------------- KD + SD


def test_kd_self_distillation_adds_the_teachers_kl_on_the_deepest_exit():
    z1, z2, t = [1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [2.0, 1.0, 0.0]
    logits = [torch.tensor([z1]), torch.tensor([z2])]
    feats = [torch.zeros(1, 2), torch.zeros(1, 2)]
    y = torch.tensor([1])
    teacher = TeacherOutputs(torch.tensor([t]))
    loss = create_loss("kd_self_distillation", alpha=0.0, kd_weight=0.7, kd_temperature=2.0)
    terms = loss(LossInputs(logits, feats, y, teacher=teacher))
    kd = 0.7 * 4.0 * _kl(_softmax(t, 2.0), _softmax(z2, 2.0))
    assert float(terms.kl) == pytest.approx(kd, rel=1e-5)
    assert float(terms.total) == pytest.approx(_ce(z1, 1) + _ce(z2, 1) + kd, rel=1e-5)
    every = create_loss("kd_self_distillation", alpha=0.0, kd_temperature=2.0, kd_exits="all")
    kd_all = 4.0 * (
        _kl(_softmax(t, 2.0), _softmax(z1, 2.0)) + _kl(_softmax(t, 2.0), _softmax(z2, 2.0))
    )
    assert float(every(LossInputs(logits, feats, y, teacher=teacher)).kl) == pytest.approx(
        kd_all, rel=1e-5
    )


def test_kd_needs_the_teachers_outputs():
    loss = create_loss("kd_self_distillation")
    with pytest.raises(ValueError, match="teacher"):
        loss(LossInputs([torch.zeros(1, 3)], [torch.zeros(1, 2)], torch.tensor([0])))


# ----------------------------------------------------------------------------- DRG / DSR


def test_ranked_outputs_sort_each_row_ascending():
    z = torch.tensor([[3.0, -1.0, 2.0], [0.0, 5.0, 1.0]], requires_grad=True)
    r = ranked(z)
    assert r.tolist() == [[-1.0, 2.0, 3.0], [0.0, 1.0, 5.0]]
    r[:, -1].sum().backward()  # the gradient reaches each row's largest logit
    assert z.grad.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_drg_is_hl_plus_alpha_times_the_poor_teachers_kl():
    ac, final = [2.0, 0.0, 1.0], [0.0, 1.0, 3.0]
    logits = [torch.tensor([ac], requires_grad=True), torch.tensor([final], requires_grad=True)]
    y = torch.tensor([2])
    terms = create_loss("drg")(LossInputs(logits, [torch.zeros(1, 2)] * 2, y))
    rg = _kl(_softmax(ac), _softmax(final))  # τ = 1
    got = terms.as_floats()
    assert got["ce"] == pytest.approx(_ce(ac, 2) + _ce(final, 2), rel=1e-6)
    assert got["kl"] == pytest.approx(0.2 * rg, rel=1e-5)
    terms.total.backward()
    # the AC is the teacher in (9): its gradient is its CE's alone
    want = torch.softmax(torch.tensor(ac), 0) - F.one_hot(torch.tensor(2), 3)
    assert torch.allclose(logits[0].grad[0], want, atol=1e-6)


def test_dsr_compares_ranked_outputs_with_the_previous_steps():
    loss = create_loss("dsr")  # β = 1, τ = 4
    a, b = [3.0, 1.0, 2.0], [0.0, 4.0, -2.0]
    y = torch.tensor([0])
    first = loss(LossInputs([torch.tensor([a])], [torch.zeros(1, 2)], y))
    # z̃^{−1} = 0: the previous distribution is uniform
    sr0 = 16.0 * _kl([1 / 3] * 3, _softmax(sorted(a), 4.0))
    assert float(first.kl) == pytest.approx(sr0, rel=1e-5)
    assert float(first.total) == pytest.approx(_ce(a, 0) + sr0, rel=1e-5)
    second = loss(LossInputs([torch.tensor([b])], [torch.zeros(1, 2)], y))
    sr1 = 16.0 * _kl(_softmax(sorted(a), 4.0), _softmax(sorted(b), 4.0))
    assert float(second.kl) == pytest.approx(sr1, rel=1e-5)
    assert loss.state_dict()["_extra_state"]["prev_ranked"].tolist() == [sorted(b)]
    with pytest.raises(ValueError, match="previous batch"):
        loss(LossInputs([torch.zeros(2, 3)], [torch.zeros(2, 2)], torch.tensor([0, 1])))


def test_drg_dsr_is_eq_13_with_a_temperature_per_term():
    ac, final = [1.0, 0.0, 0.5], [0.0, 2.0, 1.0]
    loss = create_loss("drg_dsr", drg_alpha=0.5, dsr_beta=2.0)
    terms = loss(LossInputs([torch.tensor([ac]), torch.tensor([final])], [torch.zeros(1, 2)] * 2,
                            torch.tensor([1])))  # fmt: skip
    rg = _kl(_softmax(ac), _softmax(final))
    sr = 16.0 * _kl([1 / 3] * 3, _softmax(sorted(final), 4.0))
    assert float(terms.kl) == pytest.approx(0.5 * rg + 2.0 * sr, rel=1e-5)
    assert float(terms.total) == pytest.approx(_ce(ac, 1) + _ce(final, 1) + 0.5 * rg + 2 * sr,
                                               rel=1e-5)  # fmt: skip


def test_drg_refuses_a_single_exit_and_bad_weights():
    with pytest.raises(ValueError, match="auxiliary classifier"):
        create_loss("drg", num_exits=1)
    with pytest.raises(ValueError, match="≥ 0"):
        create_loss("dsr", dsr_beta=-1.0)


# ----------------------------------------------------------------------------- CKDF


def test_attention_map_is_the_normalised_channel_mean_of_squares():
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # N=1, C=2, H=1, W=2
    means = [(1 + 9) / 2, (4 + 0) / 2]  # 5, 2
    norm = math.hypot(*means)
    assert attention_map(x)[0].tolist() == pytest.approx([m / norm for m in means])


def test_ckdf_is_loss1_to_loss4_by_hand():
    z = [[1.0, 0.0], [0.0, 1.0], [2.0, 0.5]]  # three exits, two classes
    t = [0.5, -0.5]
    feats = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 1.0]])]
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    tx = torch.tensor([[[[2.0, 1.0]]]])
    teacher = TeacherOutputs(torch.tensor([t]), stage_maps=[tx])
    inputs = LossInputs([torch.tensor([r]) for r in z], feats, torch.tensor([1]),
                        stage_maps=[x], teacher=teacher)  # fmt: skip
    a, b, temp = 0.3, 0.6, 3.0
    terms = create_loss("ckdf", ckdf_alpha=a, ckdf_beta=b, kd_temperature=temp)(inputs)
    loss1 = (1 - a) * _ce(z[2], 1) + (1 - b) * (_ce(z[0], 1) + _ce(z[1], 1))
    pt = _softmax(t, temp)
    loss2 = a * temp**2 * (_kl(pt, _softmax(z[1], temp)) + _kl(pt, _softmax(z[2], temp)))
    loss3 = b * ((1 - 0.5) ** 2 + (2 - 1) ** 2)  # exit 1 only (K − 2 = 1)
    s_at = [5 / math.sqrt(29), 2 / math.sqrt(29)]
    t_at = [4 / math.sqrt(17), 1 / math.sqrt(17)]
    loss4 = b * sum((u - v) ** 2 for u, v in zip(s_at, t_at, strict=True)) / 2
    got = terms.as_floats()
    assert got["ce"] == pytest.approx(loss1, rel=1e-5)
    assert got["kl"] == pytest.approx(loss2, rel=1e-5)
    assert got["feature"] == pytest.approx(loss3 + loss4, rel=1e-5)
    assert got["total"] == pytest.approx(loss1 + loss2 + loss3 + loss4, rel=1e-5)


def test_ckdf_head_has_two_pair_attention_and_an_fc_layer_when_two_halvings_deep():
    from training.models.exits import CKDFExit

    deep = CKDFExit([8, 16, 32], 5)
    assert len(deep.attention.down) == 8  # two depthwise-pointwise pairs
    assert isinstance(deep.fc_layer[0], torch.nn.Linear) and len(deep.align) == 2
    near = CKDFExit([16, 32], 5)
    assert isinstance(near.fc_layer, torch.nn.Identity)
    feat, logits, fmap = deep(torch.randn(2, 8, 8, 8), with_map=True)
    assert feat.shape == (2, 32) and logits.shape == (2, 5) and fmap.shape == (2, 32, 2, 2)


# ----------------------------------------------------------------------------- SFR


def test_sinkhorn_cost_of_a_plan_free_cost_matrix_is_exact():
    # With uniform marginals every feasible plan of this cost costs 1.5 (C22 − C12 − C21 = 0),
    # so the entropic plan's cost is the exact EMD.
    cost = torch.tensor([[[0.0, 2.0], [1.0, 3.0]]])
    assert float(sinkhorn_cost(cost)[0]) == pytest.approx(1.5, abs=1e-4)
    # a permutation's cost: the optimal plan pairs 1↔2 and 2↔1 at zero cost
    perm = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert float(sinkhorn_cost(perm, eps=0.01, iters=200)[0]) == pytest.approx(0.0, abs=1e-3)


def test_emd_distance_is_zero_for_the_same_set_in_another_order():
    a = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # positions (1, 0) and (0, 1)
    b = a.flip(-1)  # the same two vectors, swapped
    assert float(emd_distance(a, b)[0]) == pytest.approx(0.0, abs=1e-3)
    # against {(−1, 0), (0, −1)}: each vector moves to an orthogonal one (cost 1), not to its
    # opposite (cost 2)
    assert float(emd_distance(a, -a)[0]) == pytest.approx(1.0, abs=1e-3)


def test_dynamic_label_smoothing_target_by_hand():
    target = F.one_hot(torch.tensor([0]), 3).float()
    previous = torch.tensor([[0.5, 0.3, 0.2]])
    got = dls_target(target, previous, 0.1)
    assert got[0].tolist() == pytest.approx([0.9, 0.1 * 0.6, 0.1 * 0.4])


def test_sfr_smooths_with_the_previous_epochs_predictions():
    loss = create_loss("sfr", sfr_weight=0.0, dls_epsilon=0.1, num_exits=2, feature_dim=2,
                       num_classes=3, train_rows=4)  # fmt: skip
    maps = [torch.zeros(1, 2, 1, 1)] * 2
    y, row = torch.tensor([0]), torch.tensor([2])
    seen = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    first = loss(LossInputs([seen, seen], [], y, maps=maps, rows=row, epoch=0))
    assert first.as_floats()["ce"] == pytest.approx(2 * -math.log(0.5), rel=1e-5)  # hard target
    z = [0.2, 0.1, -0.4]
    later = loss(LossInputs([torch.tensor([z])] * 2, [], y, maps=maps, rows=row, epoch=1))
    smooth = [0.9, 0.06, 0.04]
    want = -sum(t * math.log(p) for t, p in zip(smooth, _softmax(z), strict=True))
    assert later.as_floats()["ce"] == pytest.approx(2 * want, rel=1e-5)
    other = loss(LossInputs([torch.tensor([z])] * 2, [], y, maps=maps, rows=torch.tensor([1]),
                            epoch=1))  # fmt: skip
    assert other.as_floats()["ce"] == pytest.approx(2 * _ce(z, 0), rel=1e-5)  # row 1 unseen


def test_sfr_feature_term_weights_the_shallow_exits_by_attention():
    torch.manual_seed(0)
    loss = create_loss("sfr", dls_epsilon=0.0, sfr_weight=2.0, num_exits=3, feature_dim=2)
    maps = [torch.randn(2, 2, 1, 1) for _ in range(3)]
    weights = loss.attention_weights(maps)
    assert weights.shape == (2, 2) and torch.allclose(weights.sum(1), torch.ones(2))
    dists = torch.stack([(m - maps[2]).pow(2).flatten(1).mean(1) for m in maps[:2]], 1)
    want = 2.0 * float((weights * dists).sum(1).mean().detach())
    got = loss(LossInputs([torch.zeros(2, 3)] * 3, [], torch.tensor([0, 1]), maps=maps))
    assert got.as_floats()["feature"] == pytest.approx(want, rel=1e-5)
    assert [n for n, _ in loss.named_parameters()] == ["query.weight", "key.weight"]
