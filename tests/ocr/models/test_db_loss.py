"""DBLoss on hand-made maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ocr.models import DBLoss, balanced_bce_with_logits, dice_loss, masked_l1_loss


def _targets(b: int = 2, h: int = 32, w: int = 32, with_text: bool = True) -> dict[str, torch.Tensor]:
    prob = torch.zeros(b, 1, h, w)
    tmask = torch.zeros(b, 1, h, w)
    if with_text:
        prob[:, :, 10:20, 5:25] = 1.0
        tmask[:, :, 7:23, 2:28] = 1.0
    return {
        "prob_maps": prob,
        "prob_masks": torch.ones_like(prob),
        "thresh_maps": 0.3 + 0.4 * tmask,
        "thresh_masks": tmask,
    }


def _perfect(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    logits = torch.where(t["prob_maps"] > 0.5, 20.0, -20.0)
    return {
        "prob_logits": logits,
        "prob_map": torch.sigmoid(logits),
        "thresh_map": t["thresh_maps"].clone(),
        "binary_map": t["prob_maps"].clone(),
    }


def test_perfect_prediction_small_loss() -> None:
    t = _targets()
    total, parts = DBLoss()(_perfect(t), t)
    assert set(parts) == {"loss_prob", "loss_thresh", "loss_binary"}
    assert total.item() < 1e-3
    assert parts["loss_prob"].item() < 1e-6
    assert parts["loss_thresh"].item() < 1e-6
    assert parts["loss_binary"].item() < 1e-6


def test_bad_prediction_large_loss_and_weights() -> None:
    t = _targets()
    p = _perfect(t)
    bad = {
        "prob_logits": -p["prob_logits"],
        "prob_map": 1 - p["prob_map"],
        "thresh_map": 1 - t["thresh_maps"],
        "binary_map": 1 - t["prob_maps"],
    }
    total, parts = DBLoss()(bad, t)
    assert parts["loss_prob"].item() > 10
    assert parts["loss_binary"].item() > 0.99
    expect = 5 * parts["loss_prob"] + 10 * parts["loss_thresh"] + 1 * parts["loss_binary"]
    torch.testing.assert_close(total, expect)


def test_all_zero_target_finite() -> None:
    t = _targets(with_text=False)
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    thresh = torch.rand(2, 1, 32, 32, requires_grad=True)
    binary = torch.sigmoid(50 * (torch.sigmoid(logits) - thresh))
    total, parts = DBLoss()({"prob_logits": logits, "thresh_map": thresh, "binary_map": binary}, t)
    assert torch.isfinite(total)
    assert all(torch.isfinite(v) for v in parts.values())
    assert parts["loss_prob"].item() == 0.0  # no positive -> no mined negative (DB reference)
    assert parts["loss_thresh"].item() == 0.0  # empty threshold mask
    total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(thresh.grad).all()


def test_hard_negative_mining_matches_manual() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 10, 10) * 3
    gt = torch.zeros(1, 1, 10, 10)
    gt[0, 0, 0, :4] = 1  # 4 positives -> 12 hardest negatives
    mask = torch.ones_like(gt)
    mask[0, 0, 9] = 0  # masked-out row is ignored
    loss = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    pos = loss[0, 0, 0, :4].sum()
    neg_pool = loss[0, 0][(gt[0, 0] == 0) & (mask[0, 0] == 1)]
    neg = neg_pool.topk(12).values.sum()
    expect = (pos + neg) / 16
    got = balanced_bce_with_logits(logits, gt, mask)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_masks_are_respected() -> None:
    t = _targets()
    p = _perfect(t)
    t["prob_masks"][:, :, :, 28:] = 0
    p2 = {k: v.clone() for k, v in p.items()}
    p2["prob_logits"][:, :, :, 28:] = 20.0  # wrong, but outside the mask
    p2["binary_map"][:, :, :, 28:] = 1.0
    p2["thresh_map"][:, :, 0:3] = 0.0  # outside thresh mask
    a, _ = DBLoss()(p, t)
    b, _ = DBLoss()(p2, t)
    torch.testing.assert_close(a, b)


def test_autocast_half_inputs() -> None:
    t = _targets()
    p = {k: v.to(torch.bfloat16) for k, v in _perfect(t).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = DBLoss()(p, t)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert total.item() < 1e-2


def test_component_functions() -> None:
    x = torch.tensor([[[[0.2, 0.8]]]])
    g = torch.tensor([[[[0.0, 1.0]]]])
    m = torch.tensor([[[[1.0, 1.0]]]])
    torch.testing.assert_close(masked_l1_loss(x, g, m), torch.tensor(0.2), atol=1e-5, rtol=0)
    torch.testing.assert_close(dice_loss(x, g, m), torch.tensor(1 - 2 * 0.8 / 2.0), atol=1e-5, rtol=0)
    assert masked_l1_loss(x, g, torch.zeros_like(m)).item() == 0.0


def test_missing_threshold_outputs() -> None:
    t = _targets()
    p = _perfect(t)
    del p["thresh_map"], p["binary_map"]
    with pytest.raises(KeyError, match="with_thresh"):
        DBLoss()(p, t)


def test_accepts_bhw_targets() -> None:
    t = _targets()
    p = _perfect(t)
    t3 = {k: v[:, 0] for k, v in t.items()}
    torch.testing.assert_close(DBLoss()(p, t)[0], DBLoss()(p, t3)[0])
