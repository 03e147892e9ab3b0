"""Where the panel's results go: the query's own output segmentation, changed only where runs wrote.

Like the reference extensions (TotalSegmentator, MONAIAuto3DSeg), Apply writes into a segmentation
of its own, made on the first run next to the query in the subject hierarchy. Every segment a run
writes carries a tag; a later run replaces what earlier runs wrote there and never touches the
user's other segments. Each insertion keeps what it changed, so the panel can say exactly that and
undo it, whether or not the Segment Editor is open. No Qt: tested headless on Slicer's real MRML.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..io.volume import LabelMap
from .mrml_segments import (
    SegmentSnapshot,
    register_segmentation_converters,
    restore_segments,
    segment_tag,
    snapshot_segment,
    write_segments,
)
from .mrml_volume import mrml

RUN_TAG = "SAM2FewShot.Run"  # segment tag: the run that wrote the segment
STRUCTURE_TAG = "SAM2FewShot.Structure"  # segment tag: the result's name for it ("Liver", even if shown as "Liver (2)")
QUERY_ROLE = "SAM2FewShotQuery"  # node reference from an output segmentation to the volume it segments


@dataclass
class Change:
    """What one insertion did to an output segmentation: enough to say it and to undo it."""

    node: object  # the vtkMRMLSegmentationNode
    created: bool  # the node was made by this insertion
    written: list[str]  # ids of the segments the run wrote, in the result's order
    added: list[str] = field(default_factory=list)
    replaced: list[SegmentSnapshot] = field(default_factory=list)  # as they were before
    removed: list[SegmentSnapshot] = field(default_factory=list)  # earlier runs' segments this one lacks
    others: int = 0  # the user's own segments in the node, untouched

    def message(self) -> str:
        """One line, e.g.: In 'CT SAM2FewShot': added Liver; replaced Spleen; your 2 other segments unchanged."""
        names = {i: self.node.GetSegmentation().GetSegment(i).GetName() for i in self.written}
        parts = []
        if self.added:
            parts.append("added " + ", ".join(names[i] for i in self.added))
        if self.replaced:
            parts.append("replaced " + ", ".join(names.get(s.segment_id, s.segment.GetName()) for s in self.replaced))
        if self.removed:
            parts.append("removed " + ", ".join(s.segment.GetName() for s in self.removed)
                         + " (left by an earlier run)")
        if self.others:
            parts.append(f"your {self.others} other segment{'s' if self.others > 1 else ''} unchanged")
        return f"In '{self.node.GetName()}': {'; '.join(parts) or 'nothing changed'}."


def find_output(query_node):
    """The segmentation an earlier Apply made for this query volume, or None."""
    scene = query_node.GetScene()
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    found = None
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        if node.GetNodeReferenceID(QUERY_ROLE) == query_node.GetID():
            found = node
    return found


def run_segments(node) -> dict[str, str]:
    """structure name -> id of the segments runs wrote in ``node`` (the user's own segments are not here)."""
    segmentation = node.GetSegmentation()
    written = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        if segment_tag(segment, RUN_TAG):
            written.setdefault(segment_tag(segment, STRUCTURE_TAG) or segment.GetName(),
                               segmentation.GetNthSegmentID(n))
    return written


def insert(labels: LabelMap, query_node, output_node=None, run_id: str = "run",
           targets: Mapping[int, str] | None = None, show_3d: bool = False) -> Change:
    """Put a run's labels into ``output_node`` (the query's output segmentation when None; made here
    when there is none yet), in one step.

    Without ``targets`` (a new run) a segment replaces the one an earlier run wrote under the same
    name, the earlier runs' segments this result lacks are removed, and the rest is added; with
    ``targets`` (a refine: label value -> segment id) exactly those segments are replaced. The
    user's own segments are never touched. A failure leaves the scene as it was.
    """
    register_segmentation_converters()
    scene = query_node.GetScene()
    output_node = output_node if output_node is not None else find_output(query_node)
    created = output_node is None
    if created:
        output_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                              scene.GenerateUniqueName(f"{query_node.GetName()} SAM2FewShot"))
        output_node.SetNodeReferenceID(QUERY_ROLE, query_node.GetID())
    segmentation = output_node.GetSegmentation()
    earlier = run_segments(output_node)
    if targets is None:
        names = {s.name for s in labels.segments}
        targets = {s.value: earlier.get(s.name, "") for s in labels.segments}
        remove = [i for name, i in earlier.items() if name not in names]
    else:
        remove = []
    change = Change(output_node, created, [],
                    replaced=[snapshot_segment(output_node, i) for i in targets.values() if i],
                    removed=[snapshot_segment(output_node, i) for i in remove])
    before = set(_ids(segmentation))
    try:
        change.written = write_segments(output_node, labels, targets, query_node, remove)
        for segment_id, structure in zip(change.written, labels.segments, strict=True):
            segmentation.GetSegment(segment_id).SetTag(RUN_TAG, run_id)
            segmentation.GetSegment(segment_id).SetTag(STRUCTURE_TAG, structure.name)
    except BaseException:
        if created:
            scene.RemoveNode(output_node)
        else:  # take back whatever was written before the failure
            change.added = [i for i in _ids(segmentation) if i not in before]
            undo(change)
        raise
    change.added = [i for i in change.written if i not in before]
    change.others = len(before - set(earlier.values()) - set(change.written))
    if created:
        place_beside(output_node, query_node)
    show(output_node, show_3d)
    return change


def undo(change: Change) -> str:
    """Take an insertion back: its added segments go, replaced and removed ones return as they were."""
    node = change.node
    if node.GetScene() is None:
        return "Nothing to undo: the segmentation is no longer in the scene."
    restore_segments(node, change.replaced + change.removed, remove=change.added)
    if change.created and node.GetSegmentation().GetNumberOfSegments() == 0:
        node.GetScene().RemoveNode(node)
        return f"Undone: removed '{node.GetName()}', which the run had made."
    return f"Undone: '{node.GetName()}' is as it was before the run."


def place_beside(node, query_node) -> None:
    """Put ``node`` in the query's folder of the subject hierarchy (its study, when it has one)."""
    hierarchy = mrml().vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    query_item = hierarchy.GetItemByDataNode(query_node) if hierarchy is not None else 0
    if not query_item:
        return  # the query is not in the hierarchy (a headless scene): nothing to be beside
    parent = hierarchy.GetItemParent(query_item)
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(parent, node)
    hierarchy.SetItemParent(item, parent)


def show(node, show_3d: bool = False) -> None:
    """Visible in the slice views; in 3D too when asked (builds the closed-surface representation)."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisibility3D(bool(show_3d))
    if show_3d:
        node.CreateClosedSurfaceRepresentation()


def same_node(scene, node) -> bool:
    """True when ``node`` is still in ``scene`` as the very object it was (not a newcomer with its id:
    ids start again from 1 after a scene close)."""
    return node is not None and node.GetScene() is scene and scene.GetNodeByID(node.GetID()) is node


def _ids(segmentation) -> list[str]:
    return list(segmentation.GetSegmentIDs())
