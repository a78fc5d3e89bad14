"""Model specs: the one front door, and its errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from kpc.errors import KpcError
from kpc.specs import build_model, load_weights, parse_input_size, parse_model_spec


def test_torchvision_and_timm_specs_build_with_requested_classes_and_channels():
    tv = build_model(parse_model_spec("torchvision:resnet18", num_classes=7, input_size=(1, 32, 32)))
    assert tv(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    tm = build_model(parse_model_spec("timm:resnet18", num_classes=5, input_size=(1, 32, 32)))
    assert tm(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_file_spec_builds_the_factory(tmp_path):
    file = tmp_path / "net.py"
    file.write_text(
        "import torch.nn as nn\n"
        "def make(num_classes=3):\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(16, num_classes))\n"
    )
    model = build_model(parse_model_spec(f"{file}:make", num_classes=4))
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 4)


@pytest.mark.parametrize("argument", ["in_chans", "in_channels"])
def test_a_file_factory_is_given_the_input_channels_it_declares(tmp_path, argument):
    """`--input-size 1x...` of `net(in_chans=3)` builds the grayscale net, and a plan replays it the same way."""
    from kpc.specs import build_model_file

    file = tmp_path / "net.py"
    file.write_text(
        "import torch.nn as nn\n"
        f"def make(num_classes=3, {argument}=3):\n"
        f"    return nn.Sequential(nn.Conv2d({argument}, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(8, num_classes))\n"
    )
    spec = parse_model_spec(f"{file}:make", input_size=(1, 16, 16))
    assert build_model(spec)(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    assert build_model_file(f"{file}:make", spec)[0].in_channels == 1
    # the default fits: called as before; a value the user gave is theirs
    assert build_model(parse_model_spec(f"{file}:make", input_size=(3, 16, 16)))[0].in_channels == 3
    mine = parse_model_spec(f"{file}:make", input_size=(1, 16, 16))
    mine = type(mine)(mine.source, mine.name, mine.path, None, mine.input_size, {argument: 2})
    assert build_model_file(f"{file}:make", mine)[0].in_channels == 2


def test_unknown_names_suggest_close_matches(tmp_path):
    with pytest.raises(KpcError, match="did you mean torchvision:resnet50"):
        parse_model_spec("torchvision:resnet5O")
    with pytest.raises(KpcError, match="timm:efficientnet_b0"):
        parse_model_spec("timm:efficentnet_b0")
    with pytest.raises(KpcError, match="unknown model source"):
        parse_model_spec("keras:resnet50")
    file = tmp_path / "net.py"
    file.write_text("def build_net():\n    return None\n")
    with pytest.raises(KpcError, match="did you mean build_net"):
        build_model(parse_model_spec(f"{file}:build_nett"))


def test_input_size_parsing():
    assert parse_input_size("3x224x224") == (3, 224, 224)
    assert parse_input_size("64") == (3, 64, 64)
    with pytest.raises(KpcError, match="CxHxW"):
        parse_input_size("3x224")


def test_weights_that_do_not_fit_are_named(tmp_path):
    model = build_model(parse_model_spec("torchvision:resnet18", num_classes=10))
    other = build_model(parse_model_spec("torchvision:resnet18", num_classes=100))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(KpcError, match=r"fc.weight is \(100, 512\), model wants \(10, 512\)"):
        load_weights(model, path)
    pt = tmp_path / "w.pt"
    torch.save(model.state_dict(), pt)
    fresh = build_model(parse_model_spec("torchvision:resnet18", num_classes=10))
    load_weights(fresh, pt)
    assert torch.equal(fresh.fc.weight, model.fc.weight)
    with pytest.raises(KpcError, match="does not exist"):
        load_weights(model, tmp_path / "missing.pt")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_weights_cast_to_integers_are_refused(tmp_path, dtype):
    """torch copies int32 weights into float ones without a word: before, the model pruned was all zeros, exit 0."""
    model = build_model(parse_model_spec("torchvision:resnet18", num_classes=10))
    path = tmp_path / "w.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(KpcError, match=rf"hold {str(dtype).removeprefix('torch.')} values at 'conv1.weight' and "
                                       r"\d+ more tensors where the model has floating-point weights"):
        load_weights(model, path)
    half = tmp_path / "half.pt"  # a floating format other than float32 is cast, as before
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, half)
    load_weights(build_model(parse_model_spec("torchvision:resnet18", num_classes=10)), half)


def test_weights_saved_through_a_training_wrapper_load(tmp_path):
    """DDP and torch.compile put `module.` / `_orig_mod.` before every key of the state dict they save."""
    model = build_model(parse_model_spec("torchvision:resnet18", num_classes=10))
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DistributedDataParallel's state_dict looks like
    compiled = torch.nn.Module()
    compiled._orig_mod = wrapped  # and torch.compile around that
    for name, state in (("ddp", wrapped.state_dict()), ("compiled_ddp", compiled.state_dict())):
        assert next(iter(state)).startswith(("module.", "_orig_mod.module."))
        torch.save(state, tmp_path / f"{name}.pt")
        fresh = build_model(parse_model_spec("torchvision:resnet18", num_classes=10))
        load_weights(fresh, tmp_path / f"{name}.pt")
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(),
                                                      strict=True))
    partly = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(model.state_dict().items())}
    torch.save(partly, tmp_path / "partly.pt")  # a prefix on some keys only is no wrapper: still refused by name
    with pytest.raises(KpcError, match=r"missing keys .* unexpected keys"):
        load_weights(build_model(parse_model_spec("torchvision:resnet18", num_classes=10)), tmp_path / "partly.pt")


def test_timm_pretrained_tags_are_model_names():
    spec = parse_model_spec("timm:resnet18.a1_in1k", num_classes=10, input_size=(3, 32, 32))
    assert spec.name == "resnet18.a1_in1k"
    assert build_model(spec)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(KpcError, match=r"unknown timm tag 'no_such_tag' for resnet18; its tags: .*a1_in1k"):
        parse_model_spec("timm:resnet18.no_such_tag")


@pytest.mark.parametrize("text", ["torchvision:resnet18", "timm:resnet18.a1_in1k"])
def test_pretrained_without_a_cache_is_one_line(text, tmp_path, monkeypatch):
    monkeypatch.setenv("KPC_OFFLINE", "1")  # never download in a test: the local cache only
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(KpcError) as info:
        build_model(parse_model_spec(text, pretrained=True))
    message = str(info.value)
    assert "pretrained weights" in message and "cache" in message and "\n" not in message


def test_bad_numbers_and_factories_are_one_line(tmp_path):
    for classes in (0, -5):
        with pytest.raises(KpcError, match="--num-classes must be a positive integer"):
            parse_model_spec("torchvision:resnet18", num_classes=classes)
    file = tmp_path / "boom.py"
    file.write_text("def make(num_classes=10):\n    raise ValueError('no GPU here')\n")
    with pytest.raises(KpcError, match=r"make\(\) raised ValueError: no GPU here"):
        build_model(parse_model_spec(f"{file}:make"))
    weights = tmp_path / "w.pt"
    model = build_model(parse_model_spec("torchvision:resnet18", num_classes=10))
    state = dict(model.state_dict())
    state["fc.weight"] = "not a tensor"
    torch.save(state, weights)
    with pytest.raises(KpcError, match="not a tensor"):
        load_weights(model, weights)
