"""Which segments a run wrote and the user has edited since: those are the user's from then on.

A run stamps every segment it writes with a digest of its voxels (its own mask, cropped to its
voxels, and where that crop lies in the segmentation's frame). A later Apply compares the digest
with the segment as it is now: a segment that differs, or carries no digest (written by an older
version), was changed by someone else and is kept as it is; the new result for that structure goes
in beside it as "name (new)". Only unchanged run-written segments are replaced or removed. The
digest ignores how Slicer stores the voxels (shared layers, label values, padded extents), so
saving, reloading or editing another segment never makes a segment look edited. No Qt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..io.volume import LabelMap
from .mrml_segments import image_to_world, segment_tag
from .mrml_volume import array_from_image, mrml

RUN_TAG = "SAM2FewShot.Run"  # segment tag: the run that wrote the segment
STRUCTURE_TAG = "SAM2FewShot.Structure"  # segment tag: the result's name for it ("Liver", even if shown as "Liver (2)")
DIGEST_TAG = "SAM2FewShot.Digest"  # segment tag: digest of its voxels when the run wrote it
NEW_SUFFIX = " (new)"  # a new result beside the user's edited segment of the same structure


@dataclass
class Plan:
    """Where a new run's result goes in a segmentation, decided before anything is written."""

    targets: dict[int, str]  # label value -> id of the unchanged run-written segment it replaces ("" = new)
    names: dict[int, str]  # label value -> name of a new segment beside an edited one ("Spleen (new)")
    remove: list[str] = field(default_factory=list)  # unchanged run-written segments the result lacks
    edited: list[str] = field(default_factory=list)  # run-written segments the user changed: left as they are
    run_written: set[str] = field(default_factory=set)  # every run-written segment (edited ones too)


def own_mask(segment) -> tuple[np.ndarray, np.ndarray] | None:
    """The segment's voxels as a boolean (k, j, i) array cropped to them, and the image-to-world
    matrix of that crop (index 0 at its first voxel); None when it has no binary labelmap."""
    layer = segment.GetRepresentation(mrml().vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if layer is None:
        return None
    mask = array_from_image(layer) == segment.GetLabelValue()
    matrix = image_to_world(layer)
    nonzero = np.nonzero(mask)
    if not nonzero[0].size:
        return np.zeros((0, 0, 0), dtype=bool), matrix
    lo = [int(ax.min()) for ax in nonzero]
    hi = [int(ax.max()) + 1 for ax in nonzero]
    i0, _, j0, _, k0, _ = layer.GetExtent()
    shift = np.eye(4)
    shift[:3, 3] = (i0 + lo[2], j0 + lo[1], k0 + lo[0])
    return mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], matrix @ shift


def voxel_digest(segment) -> str:
    """A digest of what the segment covers in its segmentation's frame; "" without a labelmap."""
    found = own_mask(segment)
    if found is None:
        return ""
    mask, matrix = found
    digest = hashlib.sha256()
    digest.update(np.round(matrix[:3, :3], 6).astype(np.float64).tobytes())
    if mask.size:  # an empty segment is empty wherever its layer lies
        digest.update(np.round(matrix[:3, 3], 3).astype(np.float64).tobytes())
    digest.update(np.asarray(mask.shape, dtype=np.int64).tobytes())
    digest.update(np.packbits(mask).tobytes())
    return digest.hexdigest()


def stamp(segment, run_id: str, structure: str) -> None:
    """Mark a segment as this run's, as written now."""
    segment.SetTag(RUN_TAG, run_id)
    segment.SetTag(STRUCTURE_TAG, structure)
    segment.SetTag(DIGEST_TAG, voxel_digest(segment))


def is_edited(segment) -> bool:
    """True when a run-written segment is no longer what its run wrote (or that cannot be told)."""
    recorded = segment_tag(segment, DIGEST_TAG)
    return not recorded or recorded != voxel_digest(segment)


def run_written(node) -> list[tuple[str, str, bool]]:
    """(id, structure, edited) of each segment a run wrote in ``node``, in the segmentation's order."""
    segmentation = node.GetSegmentation()
    found = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        if segment_tag(segment, RUN_TAG):
            structure = segment_tag(segment, STRUCTURE_TAG) or segment.GetName()
            found.append((segmentation.GetNthSegmentID(n), structure, is_edited(segment)))
    return found


def plan_apply(node, labels: LabelMap) -> Plan:
    """A new run's result: each structure replaces the unchanged segment a run wrote for it, or goes
    in as a new segment (named "name (new)" beside an edited one); unchanged run-written segments the
    result lacks are removed; edited ones stay as they are."""
    written = run_written(node)
    plan = Plan({}, {}, edited=[i for i, _, edited in written if edited], run_written={i for i, _, _ in written})
    for segment in labels.segments:
        same = [(i, edited) for i, s, edited in written if s == segment.name]
        unchanged = [i for i, edited in same if not edited]
        plan.targets[segment.value] = unchanged[0] if unchanged else ""
        if not unchanged and same:  # only edited ones: the new result goes beside them
            plan.names[segment.value] = segment.name + NEW_SUFFIX
    used = set(plan.targets.values())
    plan.remove = [i for i, _, edited in written if not edited and i not in used]
    return plan
