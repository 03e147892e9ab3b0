"""Options every model-using command shares (model, frames), the help format, and the request parts
the options become. Imports nothing heavy: `sam2fewshot --help` must not wait for torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.choices import AXES, DEVICES, PRECISIONS
from ..run.request import FrameOptions
from ..sam2.build import ModelOptions
from ..sam2.models import DEFAULT_MODEL, REGISTRY

IMAGE_SIZE_RULE = "a multiple of 64, at least 128"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none worth saying (unset, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "%(default)" in text or action.default in (None, False, argparse.SUPPRESS, []):
            return text
        return text + " (default: %(default)s)"


def add_command(subparsers, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose help shows every default."""
    return subparsers.add_parser(name, help=help, description=kwargs.pop("description", help),
                                 formatter_class=HelpFormatter, **kwargs)


def add_console_args(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-q and -v, before or after the command name alike."""
    default = False if top else argparse.SUPPRESS
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="also show informational messages and ITK's own warnings")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME", help="registered model: " + ", ".join(REGISTRY))
    g.add_argument("--checkpoint", type=Path, metavar="FILE",
                   help="a local weights file instead of the download (offline sites); its config from --config "
                        "or --model")
    g.add_argument("--config", help="sam2 config name for --checkpoint, e.g. configs/sam2.1/sam2.1_hiera_t.yaml")
    g.add_argument("--image-size", type=int, metavar="PX",
                   help=f"model input size in pixels, {IMAGE_SIZE_RULE}; smaller is faster and coarser "
                        "(default: the model's own, 1024 for SAM2, 512 for MedSAM2)")
    g.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA, else Apple MPS, else the CPU")
    g.add_argument("--offline", action="store_true", help="never download; use cached weights or --checkpoint")
    g.add_argument("--random-weights", action="store_true",
                   help="the real architecture with random weights: checks the installation and measures speed "
                        "without downloading anything; its masks are meaningless")
    g.add_argument("--seed", type=int, default=0, help="seed for everything random (augmentations, random weights)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: the cores other programs leave free; 1 can be much faster on "
                        "a busy machine)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="compute type: fp32; bf16 (faster on CPUs with AMX-BF16 or AVX512-BF16 and on GPUs; "
                        "results differ slightly from fp32); auto: bf16 only where the processor has it natively "
                        "(default: bf16 on CUDA and where the processor has it natively, else fp32; "
                        "$SAM2FEWSHOT_PRECISION sets another default; the report says what ran and why)")


def add_frame_args(p: argparse.ArgumentParser, slice_range: bool = True, query_frame: bool = False) -> None:
    add_console_args(p)
    g = p.add_argument_group("frames")
    if query_frame:
        g.add_argument("--frame", type=int, metavar="N",
                       help="for a 4D query (cine, DWI, multi-echo): the frame to segment, from 0")
        g.add_argument("--component", type=int, metavar="N",
                       help="for a vector or colour query: the component to segment, from 0")
        g.add_argument("--series", metavar="UID",
                       help="for a DICOM folder query holding several series: the series to read (its UID, or "
                            "the end of it that only that series has; default: the series with the most files)")
    g.add_argument("--axis", default="auto", choices=AXES,
                   help="slicing axis; auto: the plane the prompt masks were drawn in (propagate), else the "
                        "acquisition axis (the largest voxel spacing), axial when isotropic")
    add_normalization_args(g)
    if slice_range:
        g.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"),
                       help="only segment slices FIRST..LAST (inclusive) along the slicing axis")


def add_normalization_args(group) -> None:
    group.add_argument("--normalization", default="auto", metavar="MODE",
                       help="model-input intensities (your voxels never change): auto (a CT window for CT, else "
                            "percentiles), a CT preset (abdomen, soft_tissue, liver, lung, bone, brain, ...), mr, "
                            "window:CENTRE,WIDTH or percentile:LOW,HIGH")
    group.add_argument("--per-slice-normalization", action="store_true", help="percentiles per slice, not per volume")


def model_options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(name=args.model, checkpoint=str(args.checkpoint) if args.checkpoint else None,
                        config=args.config, image_size=args.image_size, device=args.device, offline=args.offline,
                        random_weights=args.random_weights, seed=args.seed, threads=args.threads,
                        precision=getattr(args, "precision", None))


def frame_options(args: argparse.Namespace) -> FrameOptions:
    slice_range = getattr(args, "slice_range", None)
    return FrameOptions(axis=args.axis, normalization=args.normalization,
                        per_slice_normalization=args.per_slice_normalization,
                        slice_range=tuple(slice_range) if slice_range else None,
                        frame=getattr(args, "frame", None), component=getattr(args, "component", None),
                        series=getattr(args, "series", None))
