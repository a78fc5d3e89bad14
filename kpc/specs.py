"""One front door for every model: `torchvision:NAME`, `timm:NAME`, `file.py:factory`, or an artifact.

A spec is data (a dataclass that serialises to JSON) so that a pruned artifact can
record how to rebuild its architecture and `kpc.load` never needs a pickle.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kpc.errors import KpcError

SOURCES = ("torchvision", "timm", "file")
DEFAULT_INPUT_SIZE = (3, 224, 224)


@dataclass(frozen=True)
class ModelSpec:
    """How to build an (unpruned, randomly initialised) architecture."""

    source: str  # "torchvision", "timm" or "file"
    name: str  # model name, or factory function name for "file"
    path: str | None = None  # absolute path of the python file for "file"
    num_classes: int | None = None  # None: the constructor's default
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE  # C, H, W the model is built and costed for
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        try:
            return cls(
                source=data["source"],
                name=data["name"],
                path=data.get("path"),
                num_classes=data.get("num_classes"),
                input_size=tuple(data.get("input_size", DEFAULT_INPUT_SIZE)),
                kwargs=dict(data.get("kwargs", {})),
            )
        except (KeyError, TypeError) as exc:
            raise KpcError(f"model spec in plan is malformed ({exc}): the artifact is corrupt") from exc

    def label(self) -> str:
        if self.source == "file":
            return f"{self.path}:{self.name}"
        return f"{self.source}:{self.name}"


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """`3x224x224` -> (3, 224, 224); also accepts `224` (square, 3 channels)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = [3, numbers[0], numbers[0]]
    if len(numbers) != 3 or min(numbers) <= 0:
        raise KpcError(f"--input-size {text!r} is not CxHxW (e.g. 3x224x224)")
    return numbers[0], numbers[1], numbers[2]


def parse_model_spec(
    text: str,
    *,
    num_classes: int | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> ModelSpec:
    """Parse a spec string; an unknown name fails with the closest matches."""
    if ":" not in text:
        raise KpcError(
            f"model spec {text!r} has no source: use torchvision:NAME, timm:NAME, path/file.py:factory "
            "or a kpc artifact directory"
        )
    source, _, name = text.rpartition(":")
    if source.endswith(".py"):
        file = Path(source).expanduser().resolve()
        if not file.is_file():
            raise KpcError(f"model file {source} does not exist")
        spec = ModelSpec("file", name, str(file), num_classes, input_size or DEFAULT_INPUT_SIZE)
    elif source in ("torchvision", "timm"):
        _check_known_name(source, name)
        spec = ModelSpec(source, name, None, num_classes, input_size or _default_input_size(source, name))
    else:
        raise KpcError(f"unknown model source {source!r}: use torchvision:NAME, timm:NAME or path/file.py:factory")
    return spec


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    import timm

    return sorted(timm.list_models())


def _check_known_name(source: str, name: str) -> None:
    names = _torchvision_names() if source == "torchvision" else _timm_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(f'{source}:{c}' for c in close)}?" if close else ""
    raise KpcError(f"unknown {source} model {name!r}{hint}")


def _default_input_size(source: str, name: str) -> tuple[int, int, int]:
    if source == "timm":
        import timm

        try:
            cfg = timm.models.get_pretrained_cfg(name)
            if cfg is not None and cfg.input_size:
                c, h, w = cfg.input_size
                return int(c), int(h), int(w)
        except Exception:  # a cfg lookup failure only costs us the default
            pass
    return DEFAULT_INPUT_SIZE


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate the unpruned architecture, adapted to the spec's classes and input channels."""
    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.source == "torchvision":
        import torchvision

        if spec.name.startswith(("vit_", "maxvit")) and spec.input_size[1] != 224:
            kwargs.setdefault("image_size", spec.input_size[1])
        model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
        if spec.in_chans != 3:
            _adapt_first_conv(model, spec.in_chans)
    elif spec.source == "timm":
        import timm

        model = timm.create_model(spec.name, pretrained=False, in_chans=spec.in_chans, **kwargs)
    elif spec.source == "file":
        model = _build_from_file(spec, kwargs)
    else:
        raise KpcError(f"unknown model source {spec.source!r}")
    if not isinstance(model, nn.Module):
        raise KpcError(f"{spec.label()} did not return a torch.nn.Module")
    return model.eval()


def _build_from_file(spec: ModelSpec, kwargs: dict[str, Any]) -> nn.Module:
    assert spec.path is not None
    digest = hashlib.sha256(spec.path.encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(f"kpc_user_model_{digest}", spec.path)
    if module_spec is None or module_spec.loader is None:
        raise KpcError(f"cannot import {spec.path}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise KpcError(f"importing {spec.path} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, spec.name, None)
    if not callable(factory):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        close = difflib.get_close_matches(spec.name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KpcError(f"{spec.path} has no callable {spec.name!r}{hint}")
    try:
        return factory(**kwargs)
    except TypeError:
        kwargs.pop("num_classes", None)
        return factory(**kwargs)


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Swap the first convolution for one that takes `in_chans` channels (e.g. grayscale)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(
                in_chans,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups if module.groups == 1 else in_chans,
                module.bias is not None,
                module.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return
    raise KpcError("could not find a 3-channel first convolution to adapt to the requested input channels")


def load_weights(model: nn.Module, weights: Path | str) -> None:
    """Load a state dict (.pt/.pth or .safetensors); a mismatch names the offending keys."""
    path = Path(weights)
    if not path.is_file():
        raise KpcError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
    except Exception as exc:
        raise KpcError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise KpcError(f"weights {path} are not a state dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        details = []
        if wrong_shape:
            k = wrong_shape[0]
            details.append(
                f"{len(wrong_shape)} shape mismatches (first: {k} is {tuple(state[k].shape)}, "
                f"model wants {tuple(own[k].shape)})"
            )
        if missing:
            details.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise KpcError(
            f"weights {path} do not fit the architecture: {'; '.join(details)}; "
            "check the model spec, --num-classes and --input-size"
        )
    model.load_state_dict(state, strict=True)
