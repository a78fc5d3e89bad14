"""The library, model first: a model class of this file (in no zoo), a plain DataLoader, a hand-written loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kpc
from kpc.latency.model import SESSIONS


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class DepthwiseSE(nn.Module):
    """Expansion 1x1 -> depthwise 3x3 -> squeeze-excite -> projection, MobileNet-style."""

    def __init__(self, cin: int, expanded: int, cout: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(expanded, expanded, 3, 2, 1, groups=expanded, bias=False),
                                       nn.BatchNorm2d(expanded), nn.ReLU())
        self.se = SqueezeExcite(expanded, 8)
        self.project = nn.Sequential(nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.se(self.depthwise(self.expand(x))))


class MyNet(nn.Module):
    """A residual stage, a depthwise block with SE, and a concat of two branches."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.stage1 = nn.Sequential(Residual(32), Residual(32))
        self.stage2 = DepthwiseSE(32, 96, 48)
        self.left = nn.Sequential(nn.Conv2d(48, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(48, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(x.mean((2, 3)))


def _loader(batches: int = 4, batch_size: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batches * batch_size, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (batches * batch_size,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = MyNet().eval()
    before = copy.deepcopy(model.state_dict())
    example = torch.randn(1, 1, 28, 28)
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.5), calibration=_loader(),
                       importance="taylor", round_to=8, min_channels=8, ignore=("head",))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model passed in is untouched"
    return model, example, result


def test_prune_a_users_own_class_with_a_plain_dataloader(pruned):
    model, example, result = pruned
    assert isinstance(result.plan, kpc.Plan) and result.plan.model == {"source": "user",
                                                                      "class": f"{__name__}.MyNet"}
    r = result.round
    assert r.landed and r.cost_unit == "GFLOPs" and r.counted_cost <= r.limit * (1 + 1e-9)
    assert r.importance["method"] == "taylor"
    kept = {g.root: g for g in r.groups}
    assert kept["head"].prunable is False
    assert any(g.pruned for g in r.groups), "something was cut"
    # the plan says where the prune's time went, step by step
    assert {"graph", "probe", "importance", "cost model", "solve", "batchnorm"} <= set(r.seconds)
    assert all(0 <= s["wall_s"] < 600 and 0 <= s["cpu_s"] < 1200 for s in r.seconds.values())
    with torch.no_grad():
        assert result.model(example).shape == model(example).shape == (1, 10)
    assert kpc.Plan.from_json(result.plan.to_json()).to_json() == result.plan.to_json()


def test_save_and_load_onto_a_fresh_instance(pruned, tmp_path):
    _model, _example, result = pruned
    out = kpc.save(result, tmp_path / "child")
    with pytest.raises(kpc.KpcError, match="model="):  # kpc cannot rebuild a user's class by itself
        kpc.load(out)
    fresh = MyNet()
    reloaded = kpc.load(out, model=fresh)
    assert all(not hasattr(p, "_kpc") for p in fresh.parameters()) and fresh.head.in_features == 64, \
        "the instance passed in is copied, not pruned in place"
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))
    # every mistake is a kpc.KpcError, also where the exporters package raised its own type
    with pytest.raises(kpc.KpcError, match="already exists and is not empty"):
        kpc.save(result, out)
    for wrong in (None, 123):
        with pytest.raises(kpc.KpcError, match="an artifact is a directory: give its path"):
            kpc.load(wrong)


def test_without_calibration_magnitude_is_used():
    result = kpc.prune(MyNet(), torch.randn(1, 1, 28, 28), kpc.Budget(ratio=0.6))
    assert result.round.importance["method"] == "magnitude" and result.round.landed


def test_inner_distillation_in_a_hand_written_loop(pruned):
    model, example, result = pruned
    parent, child = model, copy.deepcopy(result.model)
    ikd = kpc.InnerDistillation(parent, child, example)
    assert ikd.stages and all(not p.requires_grad for p in parent.parameters())
    ikd.fit_projections(images for images, _labels in _loader(2))
    optimizer = torch.optim.SGD([p for p in ikd.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    ikd.train()
    assert not parent.training, "the parent stays in eval mode"
    for _epoch in range(6):
        for images, labels in _loader():
            logits, inner = ikd(images)
            loss = F.cross_entropy(logits, labels) + 5.0 * inner
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(inner))
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert ikd.child is child and not any(isinstance(m, nn.ModuleDict) for m in child.modules()), \
        "the projections are not part of the child"


def test_profile_and_bench_take_modules(pruned):
    model, example, result = pruned
    report = kpc.bench(model, result.model, example, runtime="ort-cpu", threads=1, iters=20, warmup=3)
    assert report["speedup"]["ratio"] > 0 and report["speedup"]["ci_low"] <= report["speedup"]["ratio"]
    assert report["threads"] == 1 and report["input_shape"] == [1, 1, 28, 28]
    table = kpc.profile(model, example, runtime="ort-cpu", threads=1, iters=3, warmup=1, model_iters=5,
                        min_channels=16)
    assert isinstance(table, kpc.LatencyTable) and table.header["full_model_ms"] > 0
    assert table.header["model"].endswith("MyNet")
    latency = kpc.prune(model, example, kpc.Budget(ms=0.7 * table.header["full_model_ms"], table=table),
                        calibration=_loader(1), min_channels=16)
    timings, left = divmod(len(latency.round.counted_samples), SESSIONS)  # one figure per runtime session
    assert latency.round.cost_unit == "ms" and timings >= 2 and left == 0


def test_batchnorm_is_recalibrated_on_the_data_and_recorded(pruned):
    model, example, _result = pruned
    loader = _loader(3)
    result = kpc.prune(model, example, kpc.Budget(ratio=0.5), calibration=loader, bn_recalibrate=3)
    assert result.round.bn_recalibration == {"batches": 3, "images": 48, "layers": 10}
    stem = result.model.stem[1]
    x = next(iter(loader))[0]
    with torch.no_grad():  # the re-estimated mean is the mean of what the pruned stem conv writes on the data
        features = result.model.stem[0](x)
    assert torch.allclose(stem.running_mean, features.mean((0, 2, 3)), atol=0.3)
    off = kpc.prune(model, example, kpc.Budget(ratio=0.5), calibration=_loader(1), bn_recalibrate=0)
    assert off.round.bn_recalibration is None
    with pytest.raises(kpc.KpcError, match="--bn-recalibrate must be a non-negative"):
        kpc.prune(model, example, kpc.Budget(ratio=0.5), calibration=_loader(1), bn_recalibrate=-1)
    with pytest.raises(kpc.KpcError, match="needs data"):
        kpc.prune(model, example, kpc.Budget(ratio=0.5), bn_recalibrate=2)
    batches = (images for images, _labels in _loader(2))  # a one-shot generator: read once, replayed for BN
    once = kpc.prune(model, example, kpc.Budget(ratio=0.5), calibration=batches, bn_recalibrate=2)
    assert once.round.bn_recalibration["batches"] == 2


class Triplets(nn.Module):
    """A user block that needs its channels in threes: a constraint no dependency graph shows."""

    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(96, 96, 3, stride=2, padding=1), nn.BatchNorm2d(96), nn.ReLU())
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        x = self.first(x)
        if x.shape[1] % 3:
            raise ValueError(f"channels must come in threes, got {x.shape[1]}")
        return self.fc(self.second(x).mean((2, 3)))


def test_a_budget_missed_because_groups_failed_the_forward_pass_says_so():
    """The safety probe keeps half of each group (48 of 96, a multiple of three), so the failure comes in the loop."""
    torch.manual_seed(0)
    example = torch.randn(1, 3, 32, 32)
    model = Triplets().eval()
    with pytest.raises(kpc.KpcError, match=r"1 of 3 groups failed the pruned model's forward pass .* smallest plan "
                                           r"left counts [\d.]+ GFLOPs: ask for at least that"):
        kpc.prune(model, example, kpc.Budget(ratio=0.15))
    result = kpc.prune(model, example, kpc.Budget(ratio=0.4))  # the rest of the network still prunes
    first = next(g for g in result.round.groups if g.root == "first.0")
    assert not first.prunable and "channels must come in threes" in first.reason
    assert result.round.landed and result.model(example).shape == (1, 10)


class LazyNet(nn.Module):
    """Lazy layers: their shapes exist only after a first forward pass."""

    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.LazyConv2d(32, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU())
        self.second = nn.Sequential(nn.LazyConv2d(64, 3, stride=2, padding=1), nn.LazyBatchNorm2d(), nn.ReLU())
        self.fc = nn.LazyLinear(10)

    def forward(self, x):
        return self.fc(self.second(self.first(x)).mean((2, 3)))


def test_a_model_of_lazy_layers_prunes_and_loads_back_onto_a_fresh_lazy_instance(tmp_path):
    """It ended in 'internal error: ValueError: Attempted to use an uninitialized parameter'."""
    torch.manual_seed(0)
    model, example = LazyNet(), torch.randn(1, 1, 28, 28)
    result = kpc.prune(model, example, kpc.Budget(ratio=0.5))
    assert result.round.landed and any(g.pruned for g in result.round.groups)
    assert model.first[0].in_channels == 1, "the caller's model took its shapes from the example"
    reloaded = kpc.load(kpc.save(result, tmp_path / "child"), model=LazyNet()).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(example), result.model.eval()(example))


def test_calibration_images_of_another_dtype():
    """Raw uint8 pixels are refused in one line (their scale is the user's call); float64 and half are cast."""
    torch.manual_seed(0)
    model, example = MyNet(), torch.randn(1, 1, 28, 28)
    labels = torch.randint(0, 10, (8,))
    raw = [(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), labels)]
    with pytest.raises(kpc.KpcError, match="calibration batch 0 holds uint8 images: give float images"):
        kpc.prune(model, example, kpc.Budget(ratio=0.6), calibration=raw, bn_recalibrate=0)
    for dtype in (torch.float64, torch.float16):
        images = torch.randn(8, 1, 28, 28).to(dtype)
        result = kpc.prune(model, example, kpc.Budget(ratio=0.6), calibration=[(images, labels)], bn_recalibrate=0)
        assert result.round.landed and result.round.importance["data"] == "user data"


def test_a_half_precision_model_is_refused_with_what_to_do():
    with pytest.raises(kpc.KpcError, match=r"the model's weights are float16: kpc prunes float32 models; pass "
                                           r"model.float\(\)"):
        kpc.prune(MyNet().half(), torch.randn(1, 1, 28, 28), kpc.Budget(ratio=0.6))


def test_a_lazy_layer_the_eval_pass_never_reaches_is_refused_by_name():
    class AuxHead(LazyNet):
        def __init__(self):
            super().__init__()
            self.aux = nn.LazyLinear(10)  # a training-only auxiliary classifier

        def forward(self, x):
            features = self.second(self.first(x)).mean((2, 3))
            return self.fc(features) + (self.aux(features) if self.training else 0)

    with pytest.raises(kpc.KpcError, match="lazy layer aux took no shape from a forward pass in eval mode"):
        kpc.prune(AuxHead(), torch.randn(1, 1, 28, 28), kpc.Budget(ratio=0.5))
