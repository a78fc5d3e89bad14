"""The importance pass in bf16: same ranking as fp32 within bf16's rounding, fp32 where a model cannot run it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kpc.artifact import open_model
from kpc.data import calibration_batches, parse_data_spec
from kpc.errors import KpcError
from kpc.importance import accumulate_gradients
from kpc.pruning import PruneSettings

from .conftest import needs_fashion_mnist


def _gradients(model: nn.Module, batches: list, precision: str) -> tuple[dict[str, torch.Tensor], str]:
    _images, used = accumulate_gradients(model, batches, precision=precision)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, used


@needs_fashion_mnist
def test_bf16_gradients_follow_the_fp32_ones(one_thread):
    model = open_model("torchvision:resnet18", num_classes=10, input_size=(1, 28, 28)).model.eval()
    batches = list(calibration_batches(parse_data_spec("fashion-mnist"), (1, 28, 28), batches=2, batch_size=8,
                                       seed=0))
    exact, used_exact = _gradients(model, batches, "fp32")
    rounded, used_rounded = _gradients(model, batches, "bf16")
    assert (used_exact, used_rounded) == ("fp32", "bf16")
    assert exact.keys() == rounded.keys()
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    for name in convs:
        a, b = exact[f"{name}.weight"].flatten(), rounded[f"{name}.weight"].flatten()
        assert not torch.equal(a, b), f"{name}: bf16 changed nothing, autocast did not run"
        cosine = float(torch.dot(a, b) / (a.norm() * b.norm()))
        assert cosine > 0.95, f"{name}: bf16 gradient points elsewhere (cosine {cosine:.3f})"
        # the per-output-channel score taylor-signed ranks: |sum over the channel's weights of w * dL/dw|
        weight = dict(model.named_parameters())[f"{name}.weight"].detach()
        score_a = (weight * exact[f"{name}.weight"]).flatten(1).sum(1).abs().numpy()
        score_b = (weight * rounded[f"{name}.weight"]).flatten(1).sum(1).abs().numpy()
        ranks_a, ranks_b = np.argsort(np.argsort(score_a)), np.argsort(np.argsort(score_b))
        spearman = np.corrcoef(ranks_a, ranks_b)[0, 1]
        assert spearman > 0.8, f"{name}: channel ranking moved (rank correlation {spearman:.2f})"


class NumpyStatistic(nn.Module):
    """A model that reads a statistic through numpy, which has no bf16: it runs in fp32 only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        scale = float(np.abs(y.detach().numpy()).mean()) + 1.0
        return self.fc(torch.relu(y / scale).mean(dim=(2, 3)))


def test_a_model_without_bf16_falls_back_to_fp32_under_auto_and_refuses_under_bf16(one_thread, monkeypatch):
    monkeypatch.setattr("exporters.device.cpu_bf16_native", lambda: True)  # auto picks bf16 on any CPU
    batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))]
    model = NumpyStatistic().eval()
    images, used = accumulate_gradients(model, batches, precision="auto")
    assert images == 4 and used == "fp32"
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with pytest.raises(KpcError, match=r"does not run in bf16.*--importance-precision fp32"):
        accumulate_gradients(model, batches, precision="bf16")


def test_unknown_precision_is_refused():
    with pytest.raises(KpcError, match="unknown importance precision 'fp8'"):
        PruneSettings(importance_precision="fp8").check()


class ViewFlattenNet(nn.Module):
    """The classic flatten, `x.view(x.size(0), -1)`: it fails on NHWC activations."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(x.view(x.size(0), -1))


@needs_fashion_mnist
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_a_model_that_cannot_run_in_nhwc_is_scored_in_its_own_layout(one_thread, precision):
    """Before: "internal error: view size is not compatible with input tensor's size and stride", blamed on bf16."""
    import kpc
    from kpc.layout import runs_in_channels_last

    torch.manual_seed(0)
    model, example = ViewFlattenNet().eval(), torch.randn(1, 1, 28, 28)
    assert not runs_in_channels_last(model, example)
    assert all(p.is_contiguous() for p in model.parameters()), "left in its own layout"
    assert runs_in_channels_last(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()).eval(), example)
    batches = list(calibration_batches(parse_data_spec("fashion-mnist"), (1, 28, 28), batches=1, batch_size=8))
    images, _used = accumulate_gradients(model, batches, precision=precision)
    assert images == 8 and model.features[0].weight.grad.abs().sum() > 0
    settings = PruneSettings(importance="taylor", importance_precision=precision, sensitivity=0)
    result = kpc.prune(model, example, kpc.Budget(ratio=0.5), calibration=batches, settings=settings)
    assert result.round.landed and any(g.pruned for g in result.round.groups)
