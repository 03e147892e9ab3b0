"""The Slicer Logic's scene work, without Qt: inputs of a run from nodes, its result into the scene.

Works on MRML nodes through the MRML bridge only (imports no Qt and no slicer module itself), so
it is tested headless against Slicer's real MRML (the slicer-core wheel). Nothing here changes
the scene until a result is inserted, and a failed insertion removes the node it created.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..common.errors import InputError
from ..io.slicing import prompt_plane, slicing_axis
from ..io.volume import LabelMap, Volume
from ..methods.registry import MethodSpec
from ..run.reports import result_axis
from .markups_prompts import MarkupsPrompts, markups_prompts
from .mrml_segments import labels_from_segmentation, segment_masks, segments_of
from .mrml_volume import volume_from_node
from .panel import changed_slices, library_cases, slice_center_ras, slice_digests
from .result_segments import Change, insert, same_node
from .sequences import Frame, check_refine_frame, check_shown, frame_of, time_point_of
from .volume_store import VolumeStore


@dataclass
class RunInputs:
    """What a job segments: the query, and its prompts (propagate) or support cases."""

    query: Volume
    prompts: LabelMap | None = None
    supports: list = field(default_factory=list)  # (Volume, LabelMap) from the scene or (Path, Path) from a library
    library: str | None = None  # retrieval: the library folder itself, indexed by the worker
    mask_slices: str = ""  # propagate: each label's prompt slices, when not all slices with voxels (a refine)
    plane: str = "auto"  # propagate: the plane the prompt masks were drawn in (io/slicing.prompt_plane)
    frame: Frame | None = None  # the time point the query was copied from, when it is a sequence's proxy
    notes: list = field(default_factory=list)  # what reading the volumes did to them (mrml_volume), for the report
    markups: MarkupsPrompts | None = None  # propagate: points and boxes from Markups nodes (markups_prompts.py)
    slice_bounds: dict = field(default_factory=dict)  # propagate: label value -> (first, last) slice (a ROI's extent)

    def slice_bounds_text(self) -> str:
        """The propagate method's ``slice_bounds`` parameter: "1:10-20;2:5-9"."""
        return ";".join(f"{v}:{a}-{b}" for v, (a, b) in sorted(self.slice_bounds.items()))


@dataclass
class PendingRun:
    """A job on the worker and where its result goes; its folder is removed when the run ends.

    The nodes are kept as the objects they were: after a scene close, a new node can have the
    same id, and must not receive this run's result.
    """

    job_id: str
    folder: object  # run.client.JobFolder
    scene: object
    query_node: object
    query: Volume
    output_node: object  # the segmentation chosen in the panel, None for the query's own output
    prompt_slices: dict  # label value -> the slices that were its prompts (propagate)
    targets: dict | None  # a refine: label value -> the segment id it replaces
    start_time: float
    frame: Frame | None = None  # the query's time point (a sequence's proxy): the result goes only there
    slice_bounds: dict = field(default_factory=dict)  # label value -> (first, last) slice it was bounded to


@dataclass
class Inserted:
    """A result in the scene: the refine step finds the user's edits by ``slice_digests``. Nothing large:
    ``query`` is the grid alone (volume_store.grid_of)."""

    query_node: object
    output_node: object
    segment_ids: list[str]
    slice_digests: dict[str, tuple[bytes, ...]]  # segment id -> its mask's slices along the run axis, as inserted
    query: Volume
    report: dict
    prompt_slices: dict[str, frozenset]  # segment id -> slices that were its prompts so far (all refines)
    change: Change | None = None  # what the insertion changed, for the panel's message and undo
    frame: Frame | None = None  # the query's time point (a sequence's proxy): Refine is made on it
    slice_bounds: dict[str, tuple[int, int]] = field(default_factory=dict)  # segment id -> its ROI's slices


def gather_inputs(method: MethodSpec, query_node, segmentation_node=None, segment_ids: Sequence[str] | None = None,
                  support_volume_node=None, library_folder: str | None = None, prompt_points=None,
                  prompt_boxes: Sequence = (), axis: str = "auto") -> RunInputs:
    """Read a run's inputs from the scene (nothing is changed); InputError for anything missing. Propagate
    also takes a point list and ROIs (markups_prompts.py), cut along the panel's ``axis`` choice."""
    if query_node is None:
        raise InputError("select the query volume to segment")
    frame = frame_of(query_node)  # recorded with the copy: the proxy shows another item once browsed
    notes: list[dict] = []  # a DICOM volume read hardened through its acquisition transform (mrml_volume)
    query = volume_from_node(query_node, notes=notes)
    markups = not method.uses_support_volume and (prompt_points is not None or bool(prompt_boxes))
    inputs = _gathered(method, query, segmentation_node, segment_ids, support_volume_node, library_folder, notes,
                       markups)
    if markups:
        cut = slicing_axis(query, inputs.plane if axis == "auto" else axis)
        inputs.markups = markups_prompts(query, query_node.GetName(), inputs.prompts.segments, cut, prompt_points,
                                         list(prompt_boxes), prompt_slices_of(inputs, cut))
        inputs.slice_bounds = dict(inputs.markups.bounds)
    inputs.frame, inputs.notes = frame, notes
    return inputs


def _gathered(method: MethodSpec, query: Volume, segmentation_node, segment_ids: Sequence[str] | None,
              support_volume_node, library_folder: str | None, notes: list[dict], markups: bool = False) -> RunInputs:
    """The inputs besides the query, read from the scene; InputError for anything missing."""
    if not method.uses_support_volume:
        what = "segmentation whose segments the points and boxes prompt" if markups else \
            "segmentation with prompt masks"
        prompts = labels_from_segmentation(_required(segmentation_node, what), query, segment_ids)
        if not prompts.volume.array.any() and not markups:
            raise InputError("the chosen segments have no voxel on the query: draw masks on a few slices first")
        plane = prompt_plane(query, prompts.volume.array, "under Advanced (Slicing plane)")  # a clear error now
        return RunInputs(query, prompts=prompts, plane=plane)
    if library_folder and method.key == "retrieval":
        library_cases(Path(library_folder))  # a clear error now for a folder without labelled cases
        return RunInputs(query, library=str(library_folder))
    if library_folder:
        return RunInputs(query, supports=list(library_cases(Path(library_folder))))
    image = volume_from_node(_required(support_volume_node, "support volume"), notes=notes)
    labels = labels_from_segmentation(_required(segmentation_node, "support segmentation"), image, segment_ids)
    if not labels.volume.array.any():
        raise InputError("the chosen support segments have no voxel on the support volume")
    return RunInputs(query, supports=[(image, labels)])


def write_inputs(inputs: RunInputs, folder: Path,
                 store: VolumeStore) -> tuple[Path, Path | None, list[tuple[Path, Path]]]:
    """The job's files: volumes through the store (written once per volume, in the cache), label maps in the
    job's private folder, library files as they are. Slow for a big volume: called off the GUI thread."""
    from ..io.volume_io import write_labels

    # Label files as plain NRRD with a JSON sidecar for the names and colours, not .seg.nrrd: SimpleITK writes
    # them, and a fresh Slicer ships SimpleITK but not slicerio or pynrrd (issue 25: registration needs nothing more).
    folder = Path(folder)
    query = store.file_for(inputs.query)
    prompts = write_labels(inputs.prompts, folder / "prompts-labels.nrrd") if inputs.prompts is not None else None
    supports = []
    for n, (image, labels) in enumerate(inputs.supports):
        if isinstance(image, (str, os.PathLike)):
            supports.append((Path(image), Path(labels)))
        else:
            supports.append((store.file_for(image), write_labels(labels, folder / f"support{n}-labels.nrrd")))
    return query, prompts, supports


def prompt_slices_of(inputs: RunInputs, axis: int) -> dict[int, frozenset]:
    """label value -> the slices (along ``axis``) where the run's prompt masks have voxels of it, or its points
    or box lie."""
    if inputs.prompts is None:
        return {}
    slices = np.moveaxis(inputs.prompts.volume.array, axis, 0)
    marked = inputs.markups.slices() if inputs.markups is not None else {}
    return {s.value: frozenset(int(t) for t in np.flatnonzero((slices == s.value).any(axis=(1, 2))))
            | marked.get(s.value, frozenset()) for s in inputs.prompts.segments}


def write_prompts(inputs: RunInputs, folder: Path) -> Path | None:
    """The run's points and boxes as the engine's prompts file in the job's folder; None without any."""
    if inputs.markups is None:
        return None
    import json

    path = Path(folder) / "prompts.json"
    path.write_text(json.dumps(inputs.markups.as_json()), encoding="utf-8")
    return path


def finish_run(run: PendingRun, labels: LabelMap, report: dict, last: Inserted | None = None,
               show_3d: bool = False, run_name: str = "run") -> Inserted:
    """The worker's result into the scene in one step, only if the run's nodes are still the very
    nodes it started with; a failure leaves the scene as it was."""
    if not same_node(run.scene, run.query_node):
        raise InputError("the query volume is no longer in the scene (removed, or the scene was closed)")
    if run.output_node is not None and not same_node(run.scene, run.output_node):
        raise InputError("the output segmentation is no longer in the scene")
    check_shown(run.frame, run.query_node)
    change = insert(labels, run.query_node, run.output_node, run_name, run.targets, show_3d, time_point_of(run.frame))
    node = change.node
    if run.targets is not None and last is not None:  # a refine: the run it refines stays tracked
        ids = list(last.segment_ids)
        prompt_slices, bounds = dict(last.prompt_slices), dict(last.slice_bounds)
    else:
        ids, prompt_slices, bounds = [], {}, {}
    ids += [i for i in change.written if i not in ids]
    for segment, segment_id in zip(labels.segments, change.written, strict=True):
        prompt_slices[segment_id] = frozenset(run.prompt_slices.get(segment.value, ()))
        bounds.pop(segment_id, None)
        if segment.value in run.slice_bounds:
            bounds[segment_id] = run.slice_bounds[segment.value]
    axis = result_axis(report, run.query)  # each segment as read back from the node, whole where they overlap
    digests = {i: slice_digests(mask, axis) for i, mask in segment_masks(node, run.query, ids)}
    return Inserted(run.query_node, node, ids, digests, run.query, report, prompt_slices, change, run.frame,
                    {i: b for i, b in bounds.items() if i in ids})


def refine_inputs(last: Inserted, scene) -> tuple[RunInputs, dict[int, str], dict[int, frozenset], list[int]]:
    """A propagate run's inputs for the segments the user corrected since the last result.

    A corrected segment is propagated from every slice that was ever its prompt (the run's own
    prompt slices and all corrections so far) plus the slices corrected now, each as it is now
    (a slice where the user erased the segment says it is absent there); a segment nobody
    touched is left out, and stays as it is. Returns the inputs, label value -> segment id to
    replace, label value -> its prompt slices, and the slices corrected now.
    """
    if not (same_node(scene, last.query_node) and same_node(scene, last.output_node)):
        raise InputError("the query volume or the segmentation of the last result is no longer in the scene")
    check_refine_frame(last.frame, last.query_node)
    ids = [i for i in last.segment_ids if last.output_node.GetSegmentation().GetSegment(i) is not None]
    axis = result_axis(last.report, last.query)
    dims = last.query.array.shape
    shape = (dims[axis], *(n for a, n in enumerate(dims) if a != axis))  # slices first, as np.moveaxis puts them
    prompts = np.zeros(shape, dtype=np.uint8 if len(ids) < 256 else np.uint16)
    named = segments_of(last.output_node, ids)
    segments, targets, chosen, corrected, bounds = [], {}, {}, set(), {}
    # each segment read whole: a corrected slice keeps the voxels another segment overlaps there
    for value, (segment_id, mask) in enumerate(segment_masks(last.output_node, last.query, ids), start=1):
        own = np.moveaxis(mask, axis, 0)
        edited = changed_slices(own, last.slice_digests[segment_id], 0)
        if not edited:
            continue
        corrected.update(edited)
        slices = sorted(set(edited) | last.prompt_slices.get(segment_id, frozenset()))
        new_value = len(segments) + 1
        for t in slices:
            prompts[t][own[t]] = new_value
        segments.append(dataclasses.replace(named[value - 1], value=new_value))
        targets[new_value], chosen[new_value] = segment_id, frozenset(slices)
        if segment_id in last.slice_bounds:  # its ROI still bounds it, widened to the slices the user corrected
            first, end = last.slice_bounds[segment_id]
            bounds[new_value] = (min(first, slices[0]), max(end, slices[-1]))
    if not segments:
        raise InputError("no slice differs from the last result: correct some slices with the Segment Editor first")
    if not prompts.any():
        raise InputError("the corrected segments have no voxel left to propagate from")
    array = np.ascontiguousarray(np.moveaxis(prompts, 0, axis))
    mask_slices = ";".join(f"{v}:{','.join(str(t) for t in sorted(s))}" for v, s in chosen.items())
    notes: list[dict] = []
    query = volume_from_node(last.query_node, notes=notes)  # the voxels again (the result kept the grid alone)
    if not query.same_grid(last.query):
        raise InputError(f"the volume '{last.query_node.GetName()}' was resampled or moved since the last result: "
                         "run Apply again instead of Refine")
    inputs = RunInputs(query, prompts=LabelMap(last.query.with_array(array), tuple(segments)),
                       mask_slices=mask_slices, frame=last.frame, notes=notes, slice_bounds=bounds)
    return inputs, targets, chosen, sorted(corrected)


def slice_position(last: Inserted, index: int) -> tuple[float, float, float]:
    """World RAS of the centre of slice ``index`` of the last result's query, along its slicing axis."""
    axis = result_axis(last.report, last.query)
    return slice_center_ras(last.query.ijk_to_ras(), last.query.array.shape, axis, index)


def segment_entries(segmentation_node) -> list[tuple[str, str, tuple[float, float, float]]]:
    """(id, name, colour) of every segment, in order: the panel's checklist."""
    segmentation = segmentation_node.GetSegmentation() if segmentation_node is not None else None
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())] if segmentation else []
    return [(i, segmentation.GetSegment(i).GetName(), tuple(segmentation.GetSegment(i).GetColor())) for i in ids]


def _required(node, what: str):
    if node is None:
        raise InputError(f"select the {what}")
    return node
