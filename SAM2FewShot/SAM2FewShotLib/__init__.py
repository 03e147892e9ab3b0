"""SAM2FewShot engine: few-shot 3D segmentation of medical volumes with SAM2. Imports no Qt.

Subpackages are layers; a module may import its own package and the layers below it, never one
above or beside it (Testing/test_layers.py checks every import, and that there are no cycles):

    cli                  the sam2fewshot command: argparse -> Request -> Runner
    slicer               the Slicer panel's Qt-free logic and MRML bridge (a cohort's review included)
    batch                cohorts: many queries, one warm model, resumable, on one machine or Ray; review
    bench                benchmarks, metrics
    run                  Request, Runner, outputs, the worker process, its protocol and client
    methods              propagate, matched support, retrieval, guided, registration (+ registry)
    library              support libraries: cases, on-disk embedding index, sync
    support              support slices, augmentation, features, matching, SAM2 memories, LoRA
    sam2 | registration  the one SAM2 core (models, frames, features, propagation) | SimpleITK
    io                   Volume, LabelMap and their files, slicing geometry, normalisation
    common               errors, progress callback, atomic files, the user cache folder
"""

__version__ = "0.1.0"

# Lowest first; packages on one line are siblings that do not import each other.
LAYERS = (("common",), ("io",), ("sam2", "registration"), ("support",), ("library",), ("methods",), ("run",),
          ("bench",), ("batch",), ("slicer",), ("cli",))
