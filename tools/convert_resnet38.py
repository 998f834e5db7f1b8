"""Convert the MXNet ResNet38 ImageNet weights to a PyTorch state dict with PSA's key names.

Usage: python tools/convert_resnet38.py ilsvrc-cls_rna-a1_cls1000_ep-0001.params resnet38_imagenet.pth

The input may also be a .pth (MXNet- or PSA-keyed); the output holds float32 tensors keyed like
``conv1a.weight``, ``b4_1.conv_branch2a.weight``, ``bn7.running_var`` (no ImageNet classifier).
Bad input: message on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import sys

import torch

from caee.core.errors import CaeeError
from caee.core.io import atomic_write
from caee.weights.checkpoints import load_resnet38_imagenet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="ResNet38 ImageNet weights (.params from MXNet, or .pth)")
    parser.add_argument("dst", help="output PyTorch state dict (.pth)")
    args = parser.parse_args(argv)
    try:
        state = load_resnet38_imagenet(args.src)
        with atomic_write(args.dst) as f:
            torch.save(state, f)
    except CaeeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = sum(v.numel() for k, v in state.items() if k.endswith(("running_mean", "running_var")))
    params = sum(v.numel() for v in state.values()) - stats
    print(f"wrote {args.dst}: {len(state)} tensors, {params:,} parameters "
          f"(+ {stats:,} BN running statistics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
