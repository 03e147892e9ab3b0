"""The Slicer Logic's scene work, without Qt: inputs of a run from nodes, its result into the scene.

Works on MRML nodes through the MRML bridge only (imports no Qt and no slicer module itself), so
it is tested headless against Slicer's real MRML (the slicer-core wheel). Nothing here changes
the scene until a result is inserted, and a failed insertion removes the node it created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..common.errors import InputError
from ..io.volume import LabelMap, Volume
from ..methods.registry import MethodSpec
from ..run.reports import report_axis
from .mrml_segments import add_labels_to_segmentation, labels_from_segmentation
from .mrml_volume import volume_from_node
from .panel import library_cases, refine_prompts, slice_center_ras

SupportCase = Union[tuple[Volume, LabelMap], tuple[Path, Path]]


@dataclass
class RunInputs:
    """What a job segments: the query, and its prompts (propagate) or support cases."""

    query: Volume
    prompts: Optional[LabelMap] = None
    supports: list = field(default_factory=list)  # (Volume, LabelMap) from the scene or (Path, Path) from a library
    library: Optional[str] = None  # retrieval: the library folder itself, indexed by the worker


@dataclass
class PendingRun:
    """A job on the worker and where its result goes; its folder is removed when the run ends."""

    job_id: str
    folder: object  # run.client.JobFolder
    query_node_id: str
    query: Volume
    output_node_id: Optional[str]
    existing: str
    axis_choice: str
    track: tuple  # segment ids the result record keeps tracking (a refine tracks the refined run's)
    start_time: float


@dataclass
class Inserted:
    """A result in the scene: the refine step compares the user's edits with ``labels``."""

    output_node_id: str
    query_node_id: str
    segment_ids: list[str]
    labels: np.ndarray  # on the query grid, values 1..N in segment_ids order, as read back from the node
    query: Volume
    axis_choice: str  # the panel's slicing-axis choice of the run, reused when refining
    report: dict


def gather_inputs(method: MethodSpec, query_node, segmentation_node=None, segment_ids: Optional[Sequence[str]] = None,
                  support_volume_node=None, library_folder: Optional[str] = None) -> RunInputs:
    """Read a run's inputs from the scene (nothing is changed); InputError for anything missing."""
    if query_node is None:
        raise InputError("select the query volume to segment")
    query = volume_from_node(query_node)
    if not method.uses_support_volume:
        prompts = labels_from_segmentation(_required(segmentation_node, "segmentation with prompt masks"), query,
                                           segment_ids)
        if not prompts.volume.array.any():
            raise InputError("the chosen segments have no voxel on the query: draw masks on a few slices first")
        return RunInputs(query, prompts=prompts)
    if library_folder and method.key == "retrieval":
        library_cases(Path(library_folder))  # a clear error now for a folder without labelled cases
        return RunInputs(query, library=str(library_folder))
    if library_folder:
        return RunInputs(query, supports=list(library_cases(Path(library_folder))))
    image = volume_from_node(_required(support_volume_node, "support volume"))
    labels = labels_from_segmentation(_required(segmentation_node, "support segmentation"), image, segment_ids)
    if not labels.volume.array.any():
        raise InputError("the chosen support segments have no voxel on the support volume")
    return RunInputs(query, supports=[(image, labels)])


def write_inputs(inputs: RunInputs, folder: Path) -> tuple[Path, Optional[Path], list[tuple[Path, Path]]]:
    """The job's files in its private folder: query, prompt labels, supports (library files as they are)."""
    from ..io.volume_io import write_labels, write_volume

    folder = Path(folder)
    query = write_volume(inputs.query, folder / "query.nrrd", compress=False)  # fast: the folder is temporary
    prompts = write_labels(inputs.prompts, folder / "prompts.seg.nrrd") if inputs.prompts is not None else None
    supports = []
    for n, (image, labels) in enumerate(inputs.supports):
        if isinstance(image, (str, os.PathLike)):
            supports.append((Path(image), Path(labels)))
        else:
            supports.append((write_volume(image, folder / f"support{n}.nrrd", compress=False),
                             write_labels(labels, folder / f"support{n}.seg.nrrd")))
    return query, prompts, supports


def insert_result(labels: LabelMap, report: dict, query_node, query: Volume, output_node=None, existing: str = "keep",
                  axis_choice: str = "auto", also_track: Sequence[str] = ()) -> Inserted:
    """Add the result's segments to ``output_node`` (a new segmentation when None), in one step.

    A node created here is removed again when adding fails, so a failure leaves the scene as it was.
    The returned record tracks the inserted segments and ``also_track`` (a refine keeps tracking
    every segment of the run it refines).
    """
    scene = query_node.GetScene()
    created = None
    if output_node is None:
        name = scene.GenerateUniqueName(f"{query_node.GetName()} SAM2FewShot")
        created = output_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        added = add_labels_to_segmentation(output_node, labels, query_node, existing)
        kept = [i for i in also_track if output_node.GetSegmentation().GetSegment(i) is not None]
        ids = list(dict.fromkeys([*kept, *added]))
        inserted = labels_from_segmentation(output_node, query, ids)
    except BaseException:
        if created is not None:
            scene.RemoveNode(created)
        raise
    return Inserted(output_node.GetID(), query_node.GetID(), ids, inserted.volume.array, query, axis_choice, report)


def finish_run(run: PendingRun, labels: LabelMap, report: dict, scene) -> Inserted:
    """The worker's result into the scene (see insert_result), unless the run's nodes are gone."""
    query_node = scene.GetNodeByID(run.query_node_id)
    if query_node is None:
        raise InputError("the query volume was removed from the scene during the run")
    output_node = scene.GetNodeByID(run.output_node_id) if run.output_node_id else None
    if run.output_node_id and output_node is None:
        raise InputError("the output segmentation was removed from the scene during the run")
    return insert_result(labels, report, query_node, run.query, output_node, run.existing, run.axis_choice, run.track)


def refine_inputs(last: Inserted, scene) -> tuple[object, object, RunInputs, list[int]]:
    """Query node, output node, and a propagate run's inputs: the slices edited since the last result."""
    query_node, output_node = scene.GetNodeByID(last.query_node_id), scene.GetNodeByID(last.output_node_id)
    if query_node is None or output_node is None:
        raise InputError("the query volume or the segmentation of the last result is no longer in the scene")
    current = labels_from_segmentation(output_node, last.query, last.segment_ids)
    array, slices = refine_prompts(current.volume.array, last.labels, report_axis(last.report))
    inputs = RunInputs(last.query, prompts=LabelMap(last.query.with_array(array), current.segments))
    return query_node, output_node, inputs, slices


def slice_position(last: Inserted, index: int) -> tuple[float, float, float]:
    """World RAS of the centre of slice ``index`` of the last result's query, along its slicing axis."""
    return slice_center_ras(last.query.ijk_to_ras(), last.query.array.shape, report_axis(last.report), index)


def segment_entries(segmentation_node) -> list[tuple[str, str, tuple[float, float, float]]]:
    """(id, name, colour) of every segment, in order: the panel's checklist."""
    segmentation = segmentation_node.GetSegmentation() if segmentation_node is not None else None
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())] if segmentation else []
    return [(i, segmentation.GetSegment(i).GetName(), tuple(segmentation.GetSegment(i).GetColor())) for i in ids]


def _required(node, what: str):
    if node is None:
        raise InputError(f"select the {what}")
    return node
