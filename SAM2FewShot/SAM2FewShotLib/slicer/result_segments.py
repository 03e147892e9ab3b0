"""Where the panel's results go: the query's own output segmentation, changed only where runs wrote.

Like the reference extensions (TotalSegmentator, MONAIAuto3DSeg), Apply writes into a segmentation
of its own, made on the first run next to the query in the subject hierarchy. Every segment a run
writes carries tags (the run, the structure, a digest of its voxels); a later run replaces or
removes only what earlier runs wrote and nobody changed since (user_edits): a segment the user
edited is theirs, and a new result for it goes in beside it. The user's other segments are never
touched. Each insertion keeps what it changed, so the panel can say exactly that and undo it
(undo_store keeps it on disk), whether or not the Segment Editor is open. No Qt: tested headless on
Slicer's real MRML.
"""

from __future__ import annotations

import dataclasses
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
from .user_edits import STRUCTURE_TAG, Plan, plan_apply, run_written, stamp

QUERY_ROLE = "SAM2FewShotQuery"  # node reference from an output segmentation to the volume it segments
TIME_POINT_ATTRIBUTE = "SAM2FewShot.TimePoint"  # an output's time point (index value) on a sequence's proxy


@dataclass
class Change:
    """What one insertion did to an output segmentation: enough to say it and to undo it.

    ``saved`` (the replaced and removed segments as they were) is the only large part: the run
    control moves it to the undo store on disk and calls ``release()``."""

    node: object  # the vtkMRMLSegmentationNode
    created: bool  # the node was made by this insertion
    written: list[str]  # ids of the segments the run wrote, in the result's order
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # names of the segments replaced in place
    removed: list[str] = field(default_factory=list)  # names of earlier runs' unchanged segments this one lacks
    kept: list[tuple[str, str]] = field(default_factory=list)  # (edited segment, new one beside it or "")
    others: int = 0  # the user's own segments in the node, untouched
    saved: list[SegmentSnapshot] = field(default_factory=list)  # replaced and removed segments, as they were

    def release(self) -> None:
        """Drop the snapshots (they are on disk now): nothing large stays in memory after a run."""
        self.saved = []

    def message(self) -> str:
        """One line, e.g.: In 'CT SAM2FewShot': added Liver; replaced Spleen; your 2 other segments unchanged."""
        beside = {new for _, new in self.kept if new}
        names = {i: self.node.GetSegmentation().GetSegment(i).GetName() for i in self.written}
        parts = []
        if [i for i in self.added if names[i] not in beside]:
            parts.append("added " + ", ".join(names[i] for i in self.added if names[i] not in beside))
        if self.replaced:
            parts.append("replaced " + ", ".join(self.replaced))
        if self.removed:
            parts.append("removed " + ", ".join(self.removed) + " (left by an earlier run)")
        for name, new in self.kept:
            parts.append(f"kept {name} as you edited it" + (f", the new result is beside it as {new}" if new else ""))
        if self.others:
            parts.append(f"your {self.others} other segment{'s' if self.others > 1 else ''} unchanged")
        return f"In '{self.node.GetName()}': {'; '.join(parts) or 'nothing changed'}."


def find_output(query_node, time_point: str | None = None):
    """The segmentation an earlier Apply made for this query volume, or None. On a sequence's proxy each
    time point (its index value) has an output of its own: results of two time points never replace
    each other in one segmentation that shows whichever was made last."""
    scene = query_node.GetScene()
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    found = None
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        if (node.GetNodeReferenceID(QUERY_ROLE) == query_node.GetID()
                and node.GetAttribute(TIME_POINT_ATTRIBUTE) == time_point):
            found = node
    return found


def insert(labels: LabelMap, query_node, output_node=None, run_id: str = "run",
           targets: Mapping[int, str] | None = None, show_3d: bool = False,
           time_point: tuple[str, str] | None = None) -> Change:
    """Put a run's labels into ``output_node`` (the query's output segmentation when None; made here
    when there is none yet), in one step.

    Without ``targets`` (a new run, any method) a segment replaces the one an earlier run wrote
    under the same name if nobody changed it since; beside one the user edited it goes in as
    "name (new)"; earlier runs' unchanged segments this result lacks are removed, edited ones stay.
    With ``targets`` (a refine: label value -> segment id) exactly those segments are replaced,
    edited or not: the user chose them for correcting. The user's own segments are never touched.
    A failure leaves the scene as it was. ``time_point`` (index value, label): the query is a sequence's
    proxy, and the query's own output is the one of that time point.
    """
    register_segmentation_converters()
    scene = query_node.GetScene()
    key, label = time_point or (None, "")
    output_node = output_node if output_node is not None else find_output(query_node, key)
    created = output_node is None
    if created:
        name = f"{query_node.GetName()} SAM2FewShot" + (f" {label}" if label else "")
        output_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        output_node.SetNodeReferenceID(QUERY_ROLE, query_node.GetID())
        if key is not None:
            output_node.SetAttribute(TIME_POINT_ATTRIBUTE, key)
    segmentation = output_node.GetSegmentation()
    plan = plan_apply(output_node, labels) if targets is None else _refine_plan(output_node, targets)
    change = _planned_change(output_node, created, plan)
    before = set(_ids(segmentation))
    try:
        change.written = write_segments(output_node, _named(labels, plan.names), plan.targets, query_node, plan.remove)
        for segment_id, structure in zip(change.written, labels.segments, strict=True):
            stamp(segmentation.GetSegment(segment_id), run_id, structure.name)
    except BaseException:
        if created:
            scene.RemoveNode(output_node)
        else:  # take back whatever was written before the failure
            change.added = [i for i in _ids(segmentation) if i not in before]
            undo(change)
        raise
    change.added = [i for i in change.written if i not in before]
    new_names = {s.name: segmentation.GetSegment(i).GetName()
                 for s, i in zip(labels.segments, change.written, strict=True) if s.value in plan.names}
    change.kept = [(n, new_names.get(s, "")) for n, s in _edited(output_node, plan.edited)]
    change.others = len(before - plan.run_written - set(plan.targets.values()) - set(change.written))
    if created:
        place_beside(output_node, query_node)
    show(output_node, show_3d)
    return change


def _planned_change(node, created: bool, plan: Plan) -> Change:
    """The change before writing: what will be replaced and removed, saved as it is now."""
    segmentation = node.GetSegmentation()
    replaced = [i for i in plan.targets.values() if i]
    return Change(node, created, [],
                  replaced=[segmentation.GetSegment(i).GetName() for i in replaced],
                  removed=[segmentation.GetSegment(i).GetName() for i in plan.remove],
                  saved=[snapshot_segment(node, i) for i in (*replaced, *plan.remove)])


def _refine_plan(node, targets: Mapping[int, str]) -> Plan:
    """A refine replaces the segments it was given, edited or not; it removes nothing."""
    return Plan(dict(targets), {}, run_written={i for i, _, _ in run_written(node)})


def _named(labels: LabelMap, names: Mapping[int, str]) -> LabelMap:
    """The labels with the new names of results that go in beside an edited segment."""
    if not names:
        return labels
    return LabelMap(labels.volume, tuple(dataclasses.replace(s, name=names.get(s.value, s.name))
                                         for s in labels.segments))


def _edited(node, segment_ids) -> list[tuple[str, str]]:
    """(name, structure) of the edited run-written segments."""
    segmentation = node.GetSegmentation()
    return [(segmentation.GetSegment(i).GetName(), segment_tag(segmentation.GetSegment(i), STRUCTURE_TAG)
             or segmentation.GetSegment(i).GetName()) for i in segment_ids]


def undo(change: Change) -> str:
    """Take an insertion back from its in-memory snapshots (a failed insertion; the tests): its
    added segments go, replaced and removed ones return as they were. The panel's Undo reads them
    from disk instead (undo_store)."""
    node = change.node
    if node.GetScene() is None:
        return "Nothing to undo: the segmentation is no longer in the scene."
    restore_segments(node, change.saved, remove=change.added)
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
