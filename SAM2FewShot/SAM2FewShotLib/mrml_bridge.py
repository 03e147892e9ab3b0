"""The MRML bridge: Slicer scene nodes <-> the engine's Volume and LabelMap.

Imports Slicer's MRML and VTK classes only (never Qt, never slicer.util GUI helpers), so it runs
inside 3D Slicer and headless with the ``slicer-core`` wheel alike. Importing this module does
not import Slicer; the first call does.
"""

from .mrml_segments import (
    POLICIES,
    add_labels_to_segmentation,
    labels_from_segmentation,
    register_segmentation_converters,
    segmentation_geometry_matches,
)
from .mrml_volume import volume_from_node, volume_to_node

__all__ = [
    "POLICIES",
    "add_labels_to_segmentation",
    "labels_from_segmentation",
    "register_segmentation_converters",
    "segmentation_geometry_matches",
    "volume_from_node",
    "volume_to_node",
]
