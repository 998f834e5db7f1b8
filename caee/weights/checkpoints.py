"""Loading weights into our modules with errors that say what went wrong and what the file is.

Three kinds of files reach us:

* ImageNet initialisations of a backbone (``net.pretrained``): ResNet38 as MXNet ``.params`` or a
  ``.pth`` with PSA's key names; torchvision's ``resnet101-*.pth`` / ``vgg16-*.pth``.
* Our own checkpoints: ``model.pth`` / ``last.pth`` (the state dict under ``"model"``), whose keys
  are those of a composition: backbone under ``backbone.`` (``backbone.conv1a.weight``) and head
  layers at top level (``fc8.weight``; AffinityNet: ``f8_3.*``, ``f8_4.*``, ``f8_5.*``, ``f9.*``).
* PSA-format checkpoints (``res38_cls.pth``, OC-CSE's ``od_cam.pth``, ``res38_aff.pth``): the same
  layers with the backbone at top level; :func:`psa_to_caee` / :func:`caee_to_psa` convert.

Every load accounts for every key: a mismatch raises :class:`~caee.core.errors.CaeeError` listing the
missing / unexpected keys and shape mismatches, naming our architecture and a guess of the file's.
Only ``num_batches_tracked`` buffers (absent from old PyTorch checkpoints) may be missing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from caee.core import distributed
from caee.core.errors import CaeeError, not_found
from caee.core.io import atomic_write

logger = logging.getLogger(__name__)

PSA_HEAD_KEYS = ("fc8", "f8_3", "f8_4", "f8_5", "f9")
_TOLERATED_MISSING = ".num_batches_tracked"
_CLASSIFIER_LAYERS = ("fc8", "fc", "classifier")
_SHOWN = 10  # keys listed per category in error messages


# ---------------------------------------------------------------- reading and writing files


def read_checkpoint(path: str | os.PathLike, advice: str = "", mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU with ``weights_only`` (no code runs from the file): the
    one place a checkpoint file is read. An unreadable file raises CaeeError naming it, followed by
    ``advice``. ``mmap``: map the file instead of reading it (for metadata only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - pickle, zip and runtime errors all mean "unreadable"
        raise CaeeError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {e})"
                        + (f"; {advice}" if advice else "")) from None


def nonfinite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating tensors in ``obj`` (nested dicts / lists) holding NaN or inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in nonfinite_tensors(v, f"{prefix}[{i}]")]
    return []


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` with ``torch.save`` atomically (temp file + rename), on rank 0 only;
    refused (nothing written) when any tensor is NaN / inf."""
    bad = nonfinite_tensors(payload)
    if bad:
        raise CaeeError(f"{path}: not written, {len(bad)} tensors are not finite (first: {bad[0]}); "
                        "training diverged: lower the learning rate or check the inputs")
    if distributed.is_main():
        with atomic_write(path) as f:
            torch.save(payload, f)


def _not_found(path: Path, config_key: str) -> CaeeError:
    hint = f"set config key '{config_key}' to an existing file" if config_key else "check the path"
    return CaeeError(f"checkpoint {not_found(path)} ({hint})")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or the one under "model" (our last.pth / model.pth) or "state_dict"."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CaeeError(f"{path}: expected a state dict (or a dict with a 'model' / 'state_dict' entry), "
                        f"got {type(obj).__name__}{' (empty)' if isinstance(obj, dict) else ''}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CaeeError(f"{path}: not a state dict of tensors: entries {bad[:_SHOWN]} are not tensors")
    return obj


def load_state_dict_file(path: str | os.PathLike, config_key: str = "") -> dict[str, torch.Tensor]:
    """Read a ``.pth`` file safely (``weights_only``, on the CPU) and return its state dict.

    Accepts a plain state dict or a dict holding it under ``"model"`` / ``"state_dict"``; a
    leading ``module.`` (DistributedDataParallel) is stripped from every key. ``config_key`` names
    the setting that pointed at the file, for the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise _not_found(path, config_key)
    where = f"from config key '{config_key}': " if config_key else ""
    obj = read_checkpoint(path, f"{where}pass a .pth state dict saved with torch.save")
    state = _unwrap(obj, path)
    bad = nonfinite_tensors(state)
    if bad:  # NaN weights give NaN CAMs or all-background argmaxes, never an error of their own
        raise CaeeError(f"{path}: {where}{len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}); "
                        "these weights cannot be used")
    return {k.removeprefix("module."): v for k, v in state.items()}


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """What our ``model.pth`` holds besides the weights (``arch``, ``net``, ``num_classes``, ...);
    {} for a plain state dict such as PSA's. Memory-mapped, so the weights are not read."""
    path = Path(path)
    if not path.is_file():
        raise _not_found(path, "")
    obj = read_checkpoint(path, mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return {k: v for k, v in obj.items() if k != "model"}
    return {}


# ---------------------------------------------------------------- recognising architectures


def _torchvision_resnet(keys: set[str]) -> str:
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in keys if k.startswith("layer") and k.count(".") >= 2}
    bottleneck = "layer1.0.conv3.weight" in keys
    depth = 2 + len(blocks) * (3 if bottleneck else 2)
    return f"torchvision ResNet-{depth}"


def _torchvision_vgg(keys: set[str]) -> str:
    idx = {k.split(".")[1] for k in keys if k.startswith("features.") and k.endswith(".weight")}
    bn = {k.split(".")[1] for k in keys if k.startswith("features.") and k.endswith(".running_mean")}
    n_conv = len(idx - bn)
    return f"torchvision VGG{n_conv + 3}{'-BN' if bn else ''}"


def _guess_backbone(keys: set[str]) -> str | None:
    if "conv1a.weight" in keys:
        return "PSA ResNet38"
    if "layer1.0.conv1.weight" in keys:
        return _torchvision_resnet(keys)
    if "features.0.weight" in keys:
        return _torchvision_vgg(keys)
    if "stage1.conv.weight" in keys:
        return "caee TinyCNN"
    if "conv1a_weight" in keys or any(k.startswith(("res2a_", "arg:", "aux:")) for k in keys):
        return "ResNet38 with MXNet parameter names"
    return None


def guess_architecture(keys: Iterable[str]) -> str:
    """A human-readable guess of what network a state dict with these keys belongs to."""
    keys = set(keys)
    if not keys:
        return "an empty state dict"
    inner = {k.removeprefix("backbone.") for k in keys if k.startswith("backbone.")}
    if inner:
        heads = sorted({k.split(".")[0] for k in keys if not k.startswith("backbone.")})
        kind = "classifier" if "fc8" in heads else "AffinityNet" if "f9" in heads else "model"
        backbone = _guess_backbone(inner) or "an unknown"
        head_txt = f", head layers {', '.join(heads)}" if heads else ""
        return f"a caee {kind} ({backbone} backbone{head_txt})"
    if "conv1a.weight" in keys:
        if "fc8.weight" in keys:
            return "a PSA ResNet38 classifier (backbone at top level + fc8, like res38_cls.pth)"
        if "f9.weight" in keys:
            return "a PSA ResNet38 AffinityNet (backbone at top level + f8_3..f9, like res38_aff.pth)"
        return "PSA ResNet38 backbone weights"
    guess = _guess_backbone(keys)
    if guess:
        return guess
    return f"an unknown architecture (first keys: {sorted(keys)[:5]})"


# ---------------------------------------------------------------- loading with checks


@dataclasses.dataclass
class LoadReport:
    """What a non-strict load left out (a strict load raises instead)."""
    missing: list[str]
    unexpected: list[str]


def _listing(title: str, keys: list[str]) -> str:
    more = f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{len(keys)} {title}: {', '.join(keys[:_SHOWN])}{more}"


def _shape_hint(mismatches: list[tuple[str, tuple, tuple]]) -> str:
    def is_class_count(key: str, a: tuple, b: tuple) -> bool:
        layer = key.removeprefix("backbone.").split(".")[0]
        return layer in _CLASSIFIER_LAYERS and len(a) == len(b) and a[1:] == b[1:]
    if all(is_class_count(*m) for m in mismatches):
        key, a, b = mismatches[0]
        return (f"The number of classes differs (checkpoint {a[0]}, model {b[0]}): "
                "was it trained on another dataset?")
    return "The layer widths differ: was it trained with another net.width or backbone?"


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True, arch: str,
              source: str, ignore: tuple[str, ...] = (), file_looks_like: str | None = None) -> LoadReport:
    """Copy ``state`` into ``module``, checking keys and shapes first.

    ``arch`` names our module (e.g. "classifier/resnet38"), ``source`` the file. ``ignore``: key
    prefixes left out on both sides (e.g. ``("fc.",)`` drops torchvision's ImageNet classifier).
    Missing ``num_batches_tracked`` buffers are always tolerated. ``strict=False`` allows missing
    and unexpected keys (returned in the report) but never a shape mismatch. ``file_looks_like``
    overrides the guessed architecture in messages (for a state dict whose keys were converted).
    """
    def kept(key: str) -> bool:
        return not (ignore and key.startswith(ignore))
    own = {k: v for k, v in module.state_dict().items() if kept(k)}
    state = {k: v for k, v in state.items() if kept(k)}
    missing = [k for k in own if k not in state and not k.endswith(_TOLERATED_MISSING)]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched or (strict and (missing or unexpected)):
        parts = [f"cannot load {source} into {arch}: the checkpoint looks like "
                 f"{file_looks_like or guess_architecture(state)}"]
        if missing:
            parts.append(_listing(f"keys of {arch} missing from the checkpoint", missing))
        if unexpected:
            parts.append(_listing(f"checkpoint keys {arch} does not have", unexpected))
        if mismatched:
            lines = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched[:_SHOWN]]
            more = f"; ... and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else ""
            parts.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(lines) + more)
            parts.append(_shape_hint(mismatched))
        raise CaeeError(".\n  ".join(parts))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if missing or unexpected:
        logger.warning("%s -> %s: %d keys not in the checkpoint, %d checkpoint keys unused",
                       source, arch, len(missing), len(unexpected))
    return LoadReport(missing, unexpected)


# ---------------------------------------------------------------- key layouts


def psa_to_caee(state: Mapping[str, torch.Tensor],
                head_keys: tuple[str, ...] = PSA_HEAD_KEYS) -> dict[str, torch.Tensor]:
    """PSA layout (backbone at top level) -> ours: keys whose first component is a head layer stay,
    every other key gets ``backbone.`` prepended (keys already under ``backbone.`` stay too)."""
    out = {}
    for k, v in state.items():
        top = k.split(".")[0]
        out[k if top in head_keys or top == "backbone" else "backbone." + k] = v
    return out


def caee_to_psa(state: Mapping[str, torch.Tensor],
                head_keys: tuple[str, ...] = PSA_HEAD_KEYS) -> dict[str, torch.Tensor]:
    """Ours -> PSA layout: ``backbone.`` is stripped, head layers stay. A backbone key whose first
    component is a head name would not survive the round trip and is an error."""
    out = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            inner = k.removeprefix("backbone.")
            if inner.split(".")[0] in head_keys:
                raise CaeeError(f"backbone key {k!r} would collide with head layer {inner.split('.')[0]!r} "
                                "in the PSA layout")
            out[inner] = v
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------- entry points


def _describe_file(path: Path) -> str:
    """Best-effort architecture guess for a file another loader rejected."""
    try:
        return guess_architecture(load_state_dict_file(path))
    except CaeeError:
        return "not a PyTorch state dict (an MXNet .params file or unreadable)"


def load_resnet38_imagenet(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """ResNet38 ImageNet weights keyed as PSA's backbone (float32), from ``.params`` or ``.pth``.

    The format is sniffed from the first 8 bytes (the MXNet list magic), not the suffix. Every
    backbone key of :func:`caee.weights.mxnet_params.psa_resnet38_keys` must be present.
    """
    from caee.weights import mxnet_params as mx

    path = str(path)
    if mx.is_mxnet_file(path):
        state = mx.resnet38_mxnet_to_psa(mx.read_mxnet_params(path))
    else:
        state = mx.resnet38_from_torch(read_checkpoint(path), path)
    missing = [k for k in mx.psa_resnet38_keys() if k not in state]
    if missing:
        raise CaeeError(f"{path}: {len(missing)} ResNet38 backbone tensors missing, e.g. {missing[:5]}; "
                        f"is this ilsvrc-cls_rna-a1_cls1000_ep-0001.params (resnet_38d.params)?")
    return state


def load_imagenet_weights(backbone: nn.Module, path: str | os.PathLike,
                          config_key: str = "net.pretrained") -> None:
    """Initialise ``backbone`` from its ImageNet file; every backbone key must be in the file.

    The backbone declares the file: ``imagenet_format`` "resnet38" (MXNet ``.params`` or a ``.pth``
    with PSA's keys, :func:`load_resnet38_imagenet`) or "torch" (a state dict of its keys), and
    ``imagenet_extra``, the file's key prefixes it lacks (torchvision's ``fc.*`` / ``classifier.*``).
    """
    path = Path(path)
    if not path.is_file():
        raise _not_found(path, config_key)
    name = type(backbone).__name__
    arch = f"{name} backbone ({getattr(backbone, 'out_channels', '?')} output channels)"
    fmt = getattr(backbone, "imagenet_format", "torch")
    if fmt == "resnet38":
        try:
            state = load_resnet38_imagenet(path)
        except CaeeError as e:
            raise CaeeError(f"{e}\n  (loading into {arch}; the file looks like {_describe_file(path)})") from None
    elif fmt == "torch":
        state = load_state_dict_file(path, config_key)
    else:
        raise CaeeError(f"{name} declares an unknown ImageNet file format {fmt!r}")
    load_into(backbone, state, arch=arch, source=str(path), ignore=tuple(getattr(backbone, "imagenet_extra", ())))
    logger.info("loaded ImageNet weights for %s from %s", name, path)


def load_model_weights(model: nn.Module, path: str | os.PathLike, arch: str,
                       config_key: str = "") -> None:
    """Load our ``model.pth`` / ``last.pth`` or a PSA-format checkpoint into ``model`` (strict).

    A file without ``backbone.`` keys loaded into a model that has them is taken to be in PSA's
    layout and converted with :func:`psa_to_caee`, the model's top-level children other than
    ``backbone`` being the head layers.
    """
    state = load_state_dict_file(path, config_key)
    source, looks_like = str(path), guess_architecture(state)
    model_is_composite = any(k.startswith("backbone.") for k in model.state_dict())
    if model_is_composite and not any(k.startswith("backbone.") for k in state):
        heads = tuple(n for n, _ in model.named_children() if n != "backbone")
        state = psa_to_caee(state, head_keys=heads)
        source += " (no 'backbone.' keys: read in PSA's layout)"
    load_into(model, state, strict=True, arch=arch, source=source, file_looks_like=looks_like)
    logger.info("loaded %s weights from %s", arch, path)


def init_weights_from(model: nn.Module, path: str | os.PathLike, arch: str, config_key: str = "") -> str:
    """Initialise ``model`` (a composition with ``.backbone``) from ``path``: the whole model when the
    file is a checkpoint of the same kind, else only ``backbone.*`` (e.g. a DeepLab or AffinityNet
    started from a trained classifier, ours or PSA's). Returns ``"model"`` or ``"backbone"``."""
    state = load_state_dict_file(path, config_key)
    heads = {n for n, _ in model.named_children() if n != "backbone"}
    file_heads = {k.split(".")[0] for k in state if not k.startswith("backbone.")} & (set(PSA_HEAD_KEYS) | heads)
    if file_heads & heads or not file_heads:
        load_model_weights(model, path, arch, config_key)
        return "model"
    if not any(k.startswith("backbone.") for k in state):
        state = psa_to_caee(state, head_keys=PSA_HEAD_KEYS)
    inner = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    load_into(model.backbone, inner, strict=True, arch=f"{arch} backbone", source=f"{path} (backbone.* only)",
              file_looks_like=guess_architecture(state))
    logger.info("%s: backbone weights only, from %s (its %s dropped; the heads keep their fresh "
                "initialisation)", arch, path, ", ".join(sorted(file_heads)))
    return "backbone"

__all__ = ["checkpoint_meta", "init_weights_from", "load_state_dict_file", "load_into", "LoadReport", "guess_architecture",
           "psa_to_caee", "caee_to_psa", "load_imagenet_weights", "load_model_weights", "load_resnet38_imagenet",
           "read_checkpoint", "save_checkpoint", "PSA_HEAD_KEYS"]
