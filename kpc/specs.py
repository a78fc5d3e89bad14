"""One front door for every model: `torchvision:NAME`, `timm:NAME[.TAG]`, `file.py:factory`, or an artifact.

A spec is data (a dataclass that serialises to JSON) so that a pruned artifact can
record how to rebuild its architecture and `kpc.load` never needs a pickle. A spec read
from a plan is checked field by field: a registry name must exist, constructor arguments
must be JSON scalars the constructor accepts and never name files, URLs or weights, and a
file-built model is rebuilt only from a file the caller names, never the plan.

Importing this module does not import torch; building a model does.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import logging
import math
import os
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpc.errors import KpcError
from kpc.plan import MAX_INPUT_ELEMENTS

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

SOURCES = ("torchvision", "timm", "file")
# what a training wrapper puts before every key of the state dict it saves: DistributedDataParallel and
# DataParallel (module.), torch.compile (_orig_mod.)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DEFAULT_INPUT_SIZE = (3, 224, 224)
# Constructor arguments a plan may never carry: they make a constructor read files or the network.
_UNSAFE_KWARG = re.compile(r"path|file|url|weight|pretrained|checkpoint|cfg|cache|dir|hub|download", re.IGNORECASE)
_SCALARS = (str, int, float, bool, type(None))
DOWNLOAD_TIMEOUT_S = 20


@dataclass(frozen=True)
class ModelSpec:
    """How to build an (unpruned) architecture."""

    source: str  # "torchvision", "timm" or "file"
    name: str  # model name (timm: with an optional pretrained tag), or factory function name for "file"
    path: str | None = None  # absolute path of the python file for "file" (informative in a plan)
    num_classes: int | None = None  # None: the constructor's default
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE  # C, H, W the model is built and costed for
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments (JSON scalars)
    pretrained: bool = False  # load the registry's pretrained weights from the local cache

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    def without_pretrained(self) -> ModelSpec:
        return ModelSpec(self.source, self.name, self.path, self.num_classes, self.input_size, dict(self.kwargs))

    @classmethod
    def from_json(cls, data: Any) -> ModelSpec:
        return cls.from_plan(data, None)

    @classmethod
    def from_plan(cls, data: Any, input_size: Any) -> ModelSpec:
        """A spec from a plan's `model` field, checked as untrusted input (see the module docstring)."""
        where = "plan.model"
        if not isinstance(data, dict):
            raise KpcError(f"{where} should be an object, got {type(data).__name__}")
        source, name = data.get("source"), data.get("name")
        if source not in SOURCES:
            raise KpcError(f"{where}.source should be one of {', '.join(SOURCES)}, got {source!r}")
        if not isinstance(name, str) or not name:
            raise KpcError(f"{where}.name should be a model name, got {name!r}")
        if source in ("torchvision", "timm"):
            check_known_name(source, name)
        elif not name.isidentifier():
            raise KpcError(f"{where}.name should be a Python function name, got {name!r}")
        classes = data.get("num_classes")
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
            raise KpcError(f"{where}.num_classes should be a positive integer, got {classes!r}")
        size = input_size if input_size is not None else data.get("input_size", list(DEFAULT_INPUT_SIZE))
        if isinstance(size, str) or not isinstance(size, (list, tuple)) or len(size) != 3 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            raise KpcError(f"{where}.input_size should be [C, H, W] with positive integers, got {size!r}")
        kwargs = data.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise KpcError(f"{where}.kwargs should be an object, got {type(kwargs).__name__}")
        for key, value in kwargs.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise KpcError(f"{where}.kwargs has a key {key!r} that is not an argument name")
            if _UNSAFE_KWARG.search(key):
                raise KpcError(f"{where}.kwargs.{key} is refused: a plan may not pass files, URLs or weights to "
                               "a constructor")
            if not isinstance(value, _SCALARS) or (isinstance(value, float) and not math.isfinite(value)):
                raise KpcError(f"{where}.kwargs.{key} should be a string, number, boolean or null, got "
                               f"{type(value).__name__}")
        path = data.get("path")
        if path is not None and not isinstance(path, str):
            raise KpcError(f"{where}.path should be a string, got {type(path).__name__}")
        return cls(source, name, path, classes, (int(size[0]), int(size[1]), int(size[2])), dict(kwargs))

    def label(self) -> str:
        if self.source == "file":
            return f"{self.path}:{self.name}"
        return f"{self.source}:{self.name}"


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """`3x224x224` -> (3, 224, 224); also accepts `224` (square, 3 channels)."""
    if text is None:
        return None
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = [3, numbers[0], numbers[0]]
    if len(numbers) != 3 or min(numbers) <= 0:
        raise KpcError(f"--input-size {text!r} is not CxHxW with positive sizes (e.g. 3x224x224)")
    if numbers[0] * numbers[1] * numbers[2] > MAX_INPUT_ELEMENTS:
        raise KpcError(f"--input-size {text!r} is {numbers[0] * numbers[1] * numbers[2]:,} values per image, above "
                       f"kpc's limit of {MAX_INPUT_ELEMENTS:,} (e.g. 3x4096x4096): the model is built, traced and "
                       "costed at this size; give a smaller one")
    return numbers[0], numbers[1], numbers[2]


def check_num_classes(num_classes: Any) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KpcError(f"--num-classes must be a positive integer (got {num_classes!r})")
    return num_classes


def parse_model_spec(text: str, *, num_classes: int | None = None, input_size: tuple[int, int, int] | None = None,
                     pretrained: bool = False) -> ModelSpec:
    """Parse a spec string; an unknown name fails with the closest matches."""
    check_num_classes(num_classes)
    if ":" not in text:
        raise KpcError(f"model spec {text!r} has no source: use torchvision:NAME, timm:NAME, path/file.py:factory "
                       "or a kpc artifact directory")
    source, _, name = text.rpartition(":")
    if source.endswith(".py"):
        if pretrained:
            raise KpcError("--pretrained applies to torchvision and timm models; a file's factory loads its own")
        file = Path(source).expanduser().resolve()
        if not file.is_file():
            raise KpcError(f"model file {source} does not exist")
        if not name.isidentifier():
            raise KpcError(f"model spec {text!r}: {name!r} is not a factory function name")
        return ModelSpec("file", name, str(file), num_classes, input_size or DEFAULT_INPUT_SIZE)
    if source in ("torchvision", "timm"):
        check_known_name(source, name)
        return ModelSpec(source, name, None, num_classes, input_size or _default_input_size(source, name),
                         pretrained=pretrained)
    raise KpcError(f"unknown model source {source!r}: use torchvision:NAME, timm:NAME or path/file.py:factory")


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    import timm

    return sorted(timm.list_models())


def check_known_name(source: str, name: str) -> None:
    """A registry name (timm: optionally `NAME.TAG`, a pretrained tag) or one line with the closest matches."""
    if source == "timm":
        import timm

        names = _timm_names()
        base, dot, tag = name.partition(".")
        if base in names and not dot:
            return
        if base in names and tag:
            tagged = timm.list_pretrained(f"{base}.*")
            if name in tagged:
                return
            hint = f"; its tags: {', '.join(t.partition('.')[2] for t in tagged[:6])}" if tagged else \
                " (it has no pretrained tags)"
            raise KpcError(f"unknown timm tag {tag!r} for {base}{hint}")
        name = base
    else:
        names = _torchvision_names()
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
    """Instantiate the architecture, adapted to the spec's classes and input channels; one line on failure.

    A `file` spec runs the file's code: only call this with a spec the user gave (never
    with one read from a plan; `kpc.artifact.fresh_architecture` keeps to that).
    """
    from torch import nn

    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.source == "file":
        return _materialized(build_file_spec(spec), spec)
    try:
        if spec.source == "torchvision":
            model = _build_torchvision(spec, kwargs)
        elif spec.source == "timm":
            model = _build_timm(spec, kwargs)
        else:
            raise KpcError(f"unknown model source {spec.source!r}")
    except KpcError:
        raise
    except Exception as exc:  # a constructor rejecting arguments (unknown kwarg, num_classes with weights, ...)
        raise KpcError(f"building {spec.label()} failed ({_first_line(exc)}): check --num-classes, --input-size "
                       "and the model's arguments") from exc
    if not isinstance(model, nn.Module):
        raise KpcError(f"{spec.label()} did not return a torch.nn.Module")
    return _materialized(model.eval(), spec)


def _materialized(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """The model with its lazy layers given their shapes (`kpc.lazy`), at the spec's input size."""
    from kpc.lazy import materialize

    return materialize(model, spec.input_size or DEFAULT_INPUT_SIZE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _build_torchvision(spec: ModelSpec, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    if spec.name.startswith(("vit_", "maxvit")) and spec.input_size[1] != 224:
        kwargs.setdefault("image_size", spec.input_size[1])
    weights = None
    if spec.pretrained:
        weights = _torchvision_cached_weights(spec.name)
    model = _with_timeout(lambda: torchvision.models.get_model(spec.name, weights=weights, **kwargs), spec)
    if spec.in_chans != 3:
        _adapt_first_conv(model, spec.in_chans)
    return model


def _torchvision_cached_weights(name: str) -> Any:
    import os

    import torch
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError) as exc:
        raise KpcError(f"torchvision:{name} has no pretrained weights") from exc
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        _check_online(f"pretrained weights for torchvision:{name} are not in the local cache ({cached})")
    return weights


def _build_timm(spec: ModelSpec, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if spec.pretrained:
        _timm_cached_or_online(spec.name)
    return _with_timeout(lambda: timm.create_model(spec.name, pretrained=spec.pretrained, in_chans=spec.in_chans,
                                                   **kwargs), spec)


def _timm_cached_or_online(name: str) -> None:
    """timm weights come from the Hugging Face hub or a URL: one line when neither cache nor network has them."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise KpcError(f"timm:{name} has no pretrained weights")
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        filenames = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in filenames if f):
            return
        _check_online(f"pretrained weights for timm:{name} are not in the Hugging Face cache", "huggingface.co")
        return
    url = getattr(cfg, "url", None)
    if url:
        import torch

        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not cached.is_file():
            _check_online(f"pretrained weights for timm:{name} are not in the local cache ({cached})")


def _check_online(what: str, host: str = "download.pytorch.org") -> None:
    """Fail in one line, quickly, when a download is needed and no network is reachable (or KPC_OFFLINE is set)."""
    if os.environ.get("KPC_OFFLINE"):
        raise KpcError(f"{what} and KPC_OFFLINE is set: copy the file there, or drop --pretrained")
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise KpcError(f"{what} and this machine has no network to download them: copy the file there, or drop "
                       "--pretrained") from None


def _with_timeout(build: Any, spec: ModelSpec) -> nn.Module:
    """Build, bounding any download a pretrained spec needs; a failed download is one line."""
    if not spec.pretrained:
        return build()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return build()
    except KpcError:
        raise
    except Exception as exc:  # urllib, huggingface_hub and torch raise their own types for a missing download
        where = "torch hub's cache" if spec.source == "torchvision" else "the Hugging Face cache"
        raise KpcError(f"pretrained weights for {spec.label()} are not in {where} and could not be downloaded "
                       f"({_first_line(exc)}); drop --pretrained or bring the weights with --weights FILE") from exc
    finally:
        socket.setdefaulttimeout(previous)


def build_model_file(text: str, spec: ModelSpec | None = None) -> nn.Module:
    """Build from `file.py:factory` the caller names (trusted), with a plan's classes and arguments if given."""
    source, _, name = str(text).rpartition(":")
    file = Path(source).expanduser().resolve()
    if not source.endswith(".py") or not name.isidentifier():
        raise KpcError(f"--model-file {text!r} should be path/file.py:factory")
    if not file.is_file():
        raise KpcError(f"model file {source} does not exist")
    kwargs = dict(spec.kwargs) if spec is not None else {}
    if spec is not None and spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    model = _build_from_file(file, name, kwargs, spec.in_chans if spec is not None else None)
    return _materialized(model, spec) if spec is not None else model


def build_file_spec(spec: ModelSpec) -> nn.Module:
    """Build a `file` spec the user just gave on the command line (trusted: they named the file)."""
    if spec.source != "file" or spec.path is None:
        raise KpcError(f"{spec.label()} is not a file spec")
    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    return _build_from_file(Path(spec.path), spec.name, kwargs, spec.in_chans)


# what a factory may call its input-channel argument (timm: in_chans; torch layers: in_channels)
CHANNEL_ARGUMENTS = ("in_chans", "in_channels", "input_channels", "num_channels")


def _channel_argument(factory: Any, in_chans: int | None, kwargs: dict[str, Any]) -> dict[str, int]:
    """`{name: in_chans}` where the factory takes its input channels by a name it declares and needs a value.

    A user who asks for `--input-size 1x28x28` of a factory `net(in_chans=3)` meant a
    grayscale net; kpc gave the factory nothing and the model then failed on its input.
    The argument is passed only where its default differs (or there is none), so a factory
    whose default already fits is called exactly as before, and never over a value the
    user gave themselves.
    """
    import inspect

    if in_chans is None or any(name in kwargs for name in CHANNEL_ARGUMENTS):
        return {}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a readable signature
        return {}
    for name in CHANNEL_ARGUMENTS:
        parameter = parameters.get(name)
        if parameter is None or parameter.kind in (parameter.POSITIONAL_ONLY, parameter.VAR_POSITIONAL):
            continue
        if parameter.default is parameter.empty or parameter.default != in_chans:
            log.info("calling %s(%s=%d) for the %d-channel input size", getattr(factory, "__name__", "factory"),
                     name, in_chans, in_chans)
            return {name: in_chans}
        return {}
    return {}


def _build_from_file(path: Path, name: str, kwargs: dict[str, Any], in_chans: int | None = None) -> nn.Module:
    from torch import nn

    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(f"kpc_user_model_{digest}", path)
    if module_spec is None or module_spec.loader is None:
        raise KpcError(f"cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a file that calls sys.exit() would end kpc silently
        raise KpcError(f"importing {path} failed: {_first_line(exc)}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KpcError(f"{path} has no callable {name!r}{hint}")
    kwargs = {**kwargs, **_channel_argument(factory, in_chans, kwargs)}
    try:
        try:
            model = factory(**kwargs)
        except TypeError:
            if "num_classes" not in kwargs:
                raise
            kwargs.pop("num_classes")
            model = factory(**kwargs)
    except (Exception, SystemExit) as exc:  # the user's factory raised (or called sys.exit): one line naming it
        raise KpcError(f"{path}:{name}() raised {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise KpcError(f"{path}:{name}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _unwrapped(state: dict[str, Any], own: dict[str, Any], path: Path) -> dict[str, Any]:
    """The state dict without a training wrapper's prefix on every key, where the model's own keys have none.

    A checkpoint saved from a DDP or torch.compile'd model (`module.conv1.weight`) fitted no
    model kpc builds, and the user read "N missing keys ... N unexpected keys".
    """
    stripped = state
    while stripped and set(stripped) != set(own):
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in stripped)
                       and not any(k.startswith(p) for k in own)), None)
        if prefix is None:
            break
        stripped = {k[len(prefix):]: v for k, v in stripped.items()}
        log.info("weights %s: dropped the %r prefix a training wrapper put before every key", path, prefix)
    return stripped  # when stripped, a plain dict: it loads with the model's own module versions (below)


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Swap the first convolution for one that takes `in_chans` channels (e.g. grayscale)."""
    from torch import nn

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
    import torch

    path = Path(weights)
    if not path.is_file():
        raise KpcError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from kpc.weights import read_state

            state: Any = read_state(path, model)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
    except KpcError:
        raise
    except Exception as exc:
        raise KpcError(f"cannot read weights {path} ({_first_line(exc)}): give a state dict saved with torch.save "
                       "(.pt/.pth) or a .safetensors file") from exc
    if not isinstance(state, dict):
        raise KpcError(f"weights {path} are not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise KpcError(f"weights {path} hold a {type(state[not_tensors[0]]).__name__} at {not_tensors[0]!r}, not a "
                       "tensor: give a state dict of tensors")
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:  # pruning scores, probes and checks would all read NaN: refuse before any of them
        raise KpcError(f"weights {path} hold non-finite values (NaN or inf) in {not_finite[0]!r}"
                       f"{f' and {len(not_finite) - 1} more tensors' if len(not_finite) > 1 else ''}: "
                       "give weights of a trained or freshly initialised model")
    own = model.state_dict()
    state = _unwrapped(state, own, path)
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
    not_real = [k for k in own if own[k].is_floating_point() and not state[k].is_floating_point()]
    if not_real:  # torch copies int32 weights into float ones without a word: a model of rounded (or zero) weights
        k = not_real[0]
        raise KpcError(f"weights {path} hold {str(state[k].dtype).removeprefix('torch.')} values at {k!r}"
                       f"{f' and {len(not_real) - 1} more tensors' if len(not_real) > 1 else ''} where the model "
                       "has floating-point weights: give the weights as saved from training (float32, float16 or "
                       "bfloat16), not quantized or cast to integers")
    if getattr(state, "_metadata", None) is None:  # a plain dict: the modules' versions are the model's own
        import collections

        state = collections.OrderedDict(state)
        state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # a module's own loader (versioned state) refuses: one line
        raise KpcError(f"weights {path} do not load into the model: {_first_line(exc)}") from exc
