"""Options every model-using command shares (model, frames), and the request parts they become."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..run.request import FrameOptions
from ..sam2.build import ModelOptions
from ..sam2.registry import DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="registered model name (see 'sam2fewshot models list')")
    g.add_argument("--checkpoint", type=Path, help="local weights file (offline sites); config from --config or --model")
    g.add_argument("--config", help="sam2 config name for --checkpoint, e.g. configs/sam2.1/sam2.1_hiera_t.yaml")
    g.add_argument("--image-size", type=int, help="model input size (default: the model's own)")
    g.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default auto)")
    g.add_argument("--offline", action="store_true", help="never download; use cached weights or --checkpoint")
    g.add_argument("--random-weights", action="store_true",
                   help="the real architecture with random weights: for tests and speed benchmarks only, "
                        "its masks are meaningless")
    g.add_argument("--seed", type=int, default=0, help="seed for everything random (default 0)")


def add_frame_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    g = p.add_argument_group("frames")
    g.add_argument("--axis", default="auto", help="slicing axis: auto (the acquisition axis), axial, coronal, sagittal")
    g.add_argument("--normalization", default="auto",
                   help="auto, a CT preset (abdomen, soft_tissue, liver, lung, bone, brain, ...), "
                        "window:CENTRE,WIDTH or percentile:LOW,HIGH")
    g.add_argument("--per-slice-normalization", action="store_true", help="percentiles per slice, not per volume")
    g.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"),
                   help="only segment slices FIRST..LAST (inclusive) along the slicing axis")


def model_options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(name=args.model, checkpoint=str(args.checkpoint) if args.checkpoint else None,
                        config=args.config, image_size=args.image_size, device=args.device, offline=args.offline,
                        random_weights=args.random_weights, seed=args.seed)


def frame_options(args: argparse.Namespace) -> FrameOptions:
    return FrameOptions(axis=args.axis, normalization=args.normalization,
                        per_slice_normalization=args.per_slice_normalization,
                        slice_range=tuple(args.slice_range) if args.slice_range else None)
