"""The DB loss's sync-free hard-negative mining (counts stay tensors, sort + rank mask)
against the CPU path (counts read, ``torch.topk``)."""

from __future__ import annotations

import pytest
import torch

from ocr.models import DBLoss, balanced_bce_with_logits
from ocr.models.loss import top_k_sum

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _case(seed: int, b: int = 2, h: int = 48, w: int = 40, text: float = 0.15, masked: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, 1, h, w, generator=g) * 4).requires_grad_(True)
    gt = (torch.rand(b, 1, h, w, generator=g) < text).float()
    mask = (torch.rand(b, 1, h, w, generator=g) >= masked).float()
    return logits, gt, mask


def _both(logits, gt, mask, ratio=3.0):
    out = []
    for sync_free in (False, True):
        x = logits.detach().clone().requires_grad_(True)
        value = balanced_bce_with_logits(x, gt, mask, ratio, sync_free=sync_free)
        value.backward()
        out.append((value.detach(), x.grad))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [3.0, 2.5])
def test_sync_free_matches_topk_value_and_grad(seed, ratio) -> None:
    (ref, ref_grad), (got, got_grad) = _both(*_case(seed), ratio=ratio)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-9)


def test_no_positive_is_exactly_zero_with_finite_zero_grad() -> None:
    logits, _, mask = _case(1)
    gt = torch.zeros_like(mask)
    for (value, grad) in _both(logits, gt, mask):
        assert value.item() == 0.0
        assert torch.isfinite(grad).all() and (grad == 0).all()


def test_negative_count_capped_by_the_negatives() -> None:
    # 90 % text: 3 x #pos is far more than the negatives there are -> every negative is kept
    logits, gt, mask = _case(2, text=0.9)
    (ref, _), (got, _) = _both(logits, gt, mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    inside = mask > 0.5
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach(), gt, reduction="none")
    expect = loss[inside].sum() / (inside.sum() + 1e-6)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def test_no_negative_inside_the_mask() -> None:
    logits, _, mask = _case(3)
    gt = torch.ones_like(mask)
    (ref, ref_grad), (got, got_grad) = _both(logits, gt, mask)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_grad, ref_grad)


def test_empty_mask() -> None:
    logits, gt, _ = _case(4)
    for value, grad in _both(logits, gt, torch.zeros_like(gt)):
        assert value.item() == 0.0 and (grad == 0).all()


def test_top_k_sum_tensor_k() -> None:
    values = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.0])
    for k in range(6):
        expect = values.topk(k).values.sum() if k else torch.tensor(0.0)
        torch.testing.assert_close(top_k_sum(values, torch.tensor(k)), expect)


def test_default_mode_follows_the_device() -> None:
    """On the CPU the topk path runs by default; the result equals the explicit sync-free one."""
    logits, gt, mask = _case(5)
    default = balanced_bce_with_logits(logits, gt, mask)
    torch.testing.assert_close(default, balanced_bce_with_logits(logits, gt, mask, sync_free=True))


@pytest.mark.gpu
@cuda
def test_cuda_loss_has_no_host_sync_and_matches_cpu() -> None:
    """The whole DBLoss forward and backward on CUDA under ``set_sync_debug_mode("error")``:
    any host synchronisation (``.item()``, ``int(tensor)``, a data-dependent shape) raises."""
    logits, gt, mask = _case(6, b=4, h=160, w=160)
    thresh = torch.rand_like(gt)
    batch = {"prob_maps": gt, "prob_masks": mask, "thresh_maps": 0.3 + 0.4 * thresh, "thresh_masks": mask}
    cpu_total, _ = DBLoss()({"prob_logits": logits, "thresh_map": thresh, "binary_map": torch.sigmoid(logits)}, batch)
    dev = torch.device("cuda")
    x = logits.detach().to(dev).requires_grad_(True)
    batch_dev = {k: v.to(dev) for k, v in batch.items()}
    preds = {"prob_logits": x, "thresh_map": thresh.to(dev), "binary_map": torch.sigmoid(x)}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, parts = DBLoss()(preds, batch_dev)
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(total.cpu(), cpu_total.detach(), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
@cuda
def test_cuda_mining_under_deterministic_algorithms() -> None:
    """``trainer.deterministic=true``: the sort and its backward have deterministic CUDA kernels."""
    logits, gt, mask = _case(7, b=2, h=96, w=96)
    x = logits.detach().cuda().requires_grad_(True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            x.grad = None
            balanced_bce_with_logits(x, gt.cuda(), mask.cuda(), sync_free=True).backward()
            grads.append(x.grad.clone())
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0], grads[1])
