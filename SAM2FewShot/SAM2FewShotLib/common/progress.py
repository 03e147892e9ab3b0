"""The progress callback every engine stage takes, progress(stage, done, total), and what the stages
count. Imports nothing heavy.

Stage names say what is happening ("encode query", "propagate backward", "register support 2/4");
``stage_unit`` tells a progress display what ``done`` and ``total`` count.
"""

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]

ENCODE_QUERY = "encode query"  # the query's slices through SAM2's image encoder
ENCODE_SUPPORTS = "encode supports"  # support (or retrieved library) slices through the encoder
PROPAGATE_FORWARD, PROPAGATE_BACKWARD = "propagate forward", "propagate backward"  # slices of each pass
EMBED_LIBRARY = "embed library"  # library cases into the on-disk index
FUSE_LABELS = "fuse labels"
FIT_LORA = "fit LoRA"
LOAD_MODEL, DOWNLOAD = "model", "download"

# What done/total count, by the stage's first word.
UNITS = {"encode": "slice", "propagate": "slice", "embed": "case", "register": "step", "fuse": "step",
         "fit": "step", "model": "step", "download": "B"}


def register_stage(index: int, count: int) -> str:
    """'register support 2/4': one support's registration (its optimiser's steps) among ``count``."""
    return f"register support {index + 1}/{count}"


def stage_unit(stage: str) -> str:
    return UNITS.get(stage.split(" ", 1)[0], "step")
