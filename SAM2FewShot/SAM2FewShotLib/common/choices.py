"""The values the user-facing options take, in one light module.

The engine validates its parameters against these tuples, the CLI offers them as choices and the
Slicer panel as combo-box items, all without importing torch, sam2 or SimpleITK (so `--help` and
the panel stay fast).
"""

AXES = ("auto", "axial", "coronal", "sagittal")  # auto: the acquisition axis (the largest spacing)
DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 where the device computes it natively, else fp32
SCHEMES = ("pair", "video", "video+memory")  # how matched supports condition SAM2
SUPPORT_SELECTIONS = ("matched", "middle")  # per query slice by similarity, or each structure's middle slice
PLACEMENTS = ("behind", "before-query", "after-query")  # where support memories sit in the video
PASS_ORDERS = ("both", "forward", "middle-out")  # how memory-conditioned passes sweep the volume
SIMILARITY_FEATURES = ("sam2", "intensity")  # matched support: how support and query slices are compared
LIBRARY_FEATURES = ("sam2", "dinov2-small", "dinov2-base", "dinov2-large")  # retrieval descriptors
EXTENTS = ("largest-run", "score")  # a structure's longest run of accepted slices, or every accepted slice
PRIORS = ("registration", "sam2")  # where guided prompts come from
PROMPT_TYPES = ("box", "mask", "box+mask")
TRANSFORMS = ("affine", "affine_bspline")  # registration
FUSION_METHODS = ("majority", "staple", "weighted")  # registration with several supports

# Environment: CPU cores a worker leaves to its host (the Slicer panel's worker leaves Slicer one).
RESERVED_CORES_ENV = "SAM2FEWSHOT_RESERVED_CORES"
