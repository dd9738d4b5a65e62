"""DBNet model: shapes, dtypes, modes, init, a tiny training run."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ocr.models import BACKBONE_CHANNELS, DBFPN, DBLoss, DBNet, ResNetBackbone



def _rect_batch(b: int = 2, size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=g) * 0.1
    prob = torch.zeros(b, 1, size, size)
    prob[:, :, 24:40, 12:52] = 1.0
    images[:, :, 24:40, 12:52] += 1.0  # the "text" is visible in the image
    thresh_mask = torch.zeros_like(prob)
    thresh_mask[:, :, 20:44, 8:56] = 1.0
    targets = {
        "prob_maps": prob,
        "prob_masks": torch.ones_like(prob),
        "thresh_maps": torch.full_like(prob, 0.3) + 0.4 * thresh_mask,
        "thresh_masks": thresh_mask,
    }
    return images, targets


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_backbone_features(name: str) -> None:
    bb = ResNetBackbone(name).eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 64, 96))
    assert bb.out_channels == BACKBONE_CHANNELS[name]
    assert [f.shape[1] for f in feats] == list(bb.out_channels)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_neck_shape() -> None:
    neck = DBFPN((64, 128, 256, 512), inner_channels=96)
    feats = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip((64, 128, 256, 512), (4, 8, 16, 32))]
    assert neck(feats).shape == (2, 96, 16, 24)
    with pytest.raises(ValueError):
        DBFPN((64, 128, 256, 512), inner_channels=90)


@pytest.mark.parametrize(
    "name,inner", [("resnet18", 256), ("resnet18", 64), ("resnet34", 64), ("resnet50", 64)]
)
def test_forward_shapes_train(name: str, inner: int) -> None:
    torch.manual_seed(0)
    model = DBNet(name, inner_channels=inner).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == {"prob_logits", "prob_map", "thresh_map", "binary_map"}
    for k, v in out.items():
        assert v.shape == (2, 1, 64, 96), k
        assert v.dtype == torch.float32, k
        assert torch.isfinite(v).all(), k
    for k in ("prob_map", "thresh_map", "binary_map"):
        assert 0.0 <= out[k].min() and out[k].max() <= 1.0, k
    torch.testing.assert_close(out["prob_map"], torch.sigmoid(out["prob_logits"]))
    expect_b = torch.sigmoid(50.0 * (out["prob_map"] - out["thresh_map"]))
    torch.testing.assert_close(out["binary_map"], expect_b)


def test_eval_modes() -> None:
    model = DBNet("resnet18", inner_channels=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        fast = model(x, with_thresh=False)
    assert set(full) == {"prob_logits", "prob_map", "thresh_map", "binary_map"}
    assert set(fast) == {"prob_logits", "prob_map"}
    torch.testing.assert_close(full["prob_map"], fast["prob_map"])
    model.thresh_in_eval = False
    with torch.no_grad():
        assert set(model(x)) == {"prob_logits", "prob_map"}
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 64, 70))


def test_channels_last_matches() -> None:
    torch.manual_seed(0)
    model = DBNet("resnet18", inner_channels=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)["prob_map"]
        model = model.to(memory_format=torch.channels_last)
        cl = model(x.contiguous(memory_format=torch.channels_last))["prob_map"]
    torch.testing.assert_close(ref, cl, atol=1e-4, rtol=1e-4)


def test_autocast_outputs_float32() -> None:
    model = DBNet("resnet18", inner_channels=64).train()
    images, targets = _rect_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        loss, parts = DBLoss()(out, targets)
    assert out["prob_logits"].dtype == torch.bfloat16
    assert out["prob_map"].dtype == out["thresh_map"].dtype == out["binary_map"].dtype == torch.float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_head_init() -> None:
    model = DBNet("resnet18", inner_channels=64)
    bns = [m for m in model.prob_head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bns += [m for m in model.neck.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.allclose(bn.bias, torch.full_like(bn.bias, 1e-4))


def test_pretrained_without_network_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, *a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", boom)
    with pytest.raises(RuntimeError, match="internet"):
        DBNet("resnet18", pretrained=True)


def test_pretrained_from_local_state_dict(tmp_path) -> None:
    src = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    model = DBNet("resnet18", pretrained=str(path), inner_channels=64)
    torch.testing.assert_close(model.backbone.stem[0].weight, src.conv1.weight)


def test_training_reduces_loss() -> None:
    torch.manual_seed(0)
    model = DBNet("resnet18", inner_channels=64).train()
    loss_fn = DBLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, targets = _rect_batch()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, parts = loss_fn(model(images), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert all(torch.isfinite(v) for v in parts.values())
    assert losses[-1] < 0.7 * losses[0], losses
