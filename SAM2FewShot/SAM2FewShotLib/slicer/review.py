"""The panel's "Review a cohort" section without Qt: a batch output folder's queue, one case at a time in
the scene, its flagged slices, and the reviewer's decisions written back (batch/review.py).

A case is loaded as a volume and a segmentation of its own (named and coloured like the result's
segments, the correction when one was recorded); loading the next case removes exactly those two
nodes, never another node of the user's scene. *Accept corrected* exports the (edited) segmentation
onto the result's grid with the result's label value for each segment of the same name. Errors reach
the panel as one sentence a clinician can act on. Tested headless on Slicer's real MRML.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..batch.review import CaseFiles, QueueRow, case_files, flagged_slices, record_review, review_queue
from ..common.errors import InputError, SAM2FewShotError
from ..io.volume import LabelMap, Segment
from ..run.reports import result_axis
from .mrml_segments import add_labels_to_segmentation, labels_from_segmentation, register_segmentation_converters
from .mrml_volume import volume_to_node
from .panel import panel_message, slice_center_ras
from .result_segments import same_node, show

CASE_ATTRIBUTE = "SAM2FewShot.ReviewCase"  # node attribute: the review case a node shows
ACCEPTED = ("accepted", "corrected")  # the decisions that vouch for a case (it may join a library)


@dataclass
class LoadedCase:
    """The case in the scene: its files, the labels as loaded, and where its flagged slices are."""

    case: str
    files: CaseFiles
    labels: LabelMap  # the result (or its correction) on the result's grid: the grid a correction is saved on
    report: dict
    axis: int  # numpy axis of the (k, j, i) arrays the run sliced along
    flagged: list[int]
    volume_node: object
    segmentation_node: object
    cursor: int = -1  # index into ``flagged`` of the slice shown last


@dataclass
class CohortReview:
    """One batch output folder open for review in ``scene``; at most one of its cases loaded."""

    scene: object
    folder: Path
    rows: list[QueueRow] = field(default_factory=list)
    loaded: LoadedCase | None = None
    reviewer: str = ""

    @classmethod
    def open(cls, scene, folder: str | Path, reviewer: str = "") -> CohortReview:
        """The folder's queue read now: InputError (one line) for a folder that is no batch output."""
        if not str(folder).strip():
            raise InputError("choose the output folder of a batch run to review")
        review = cls(scene, Path(folder).expanduser(), reviewer=reviewer)
        review.refresh()
        return review

    def refresh(self) -> list[QueueRow]:
        """The queue as the folder says now (a decision moves its case to the end)."""
        self.rows = review_queue(self.folder)
        return self.rows

    def row(self, case_id: str) -> QueueRow | None:
        return next((r for r in self.rows if r.case == case_id), None)

    # --- one case in the scene -------------------------------------------------------------------

    def load(self, case_id: str) -> LoadedCase:
        """Read the case's files, then put it in the scene in place of the previous review case (whose
        two nodes alone are removed). Nothing changes in the scene when the files cannot be read."""
        from ..io.volume_io import read_labels, read_volume

        files = case_files(self.folder, case_id)
        labels = read_labels(files.corrected or files.result)
        image = read_volume(files.query)
        report = json.loads(files.report.read_text(encoding="utf-8")) if files.report else {}
        axis = result_axis(report, labels.volume)
        self.unload()
        register_segmentation_converters()
        volume_node = volume_to_node(image, self.scene, self.scene.GenerateUniqueName(case_id))
        segmentation_node = self.scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(f"{case_id} review"))
        for node in (volume_node, segmentation_node):
            node.SetAttribute(CASE_ATTRIBUTE, case_id)
        try:
            add_labels_to_segmentation(segmentation_node, labels, volume_node)
        except BaseException:
            self._remove(volume_node, segmentation_node)
            raise
        show(segmentation_node)
        show_in_slice_views(self.scene, volume_node)
        self.loaded = LoadedCase(case_id, files, labels, report, axis, flagged_slices(report) if report else [],
                                 volume_node, segmentation_node)
        return self.loaded

    def unload(self) -> None:
        """Remove the loaded case's volume and segmentation (only those, and only if still there)."""
        if self.loaded is not None:
            self._remove(self.loaded.volume_node, self.loaded.segmentation_node)
        self.loaded = None

    def _remove(self, *nodes) -> None:
        for node in nodes:
            if same_node(self.scene, node):
                for n in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
                    display = node.GetNthDisplayNode(n)
                    if display is not None and display.GetScene() is self.scene:
                        self.scene.RemoveNode(display)
                self.scene.RemoveNode(node)

    def next_flagged(self) -> tuple[int, tuple[float, float, float]]:
        """The next flagged slice (cycling, most doubtful first) and the world position of its centre."""
        case = self._require_loaded()
        if not case.flagged:
            raise InputError(f"no slice of case {case.case} was flagged: SAM2 was sure of every slice")
        case.cursor = (case.cursor + 1) % len(case.flagged)
        index = case.flagged[case.cursor]
        return index, slice_center_ras(case.labels.volume.ijk_to_ras(), case.labels.volume.array.shape, case.axis,
                                       index)

    def show_next_flagged(self) -> str:
        """Move the slice views to the next flagged slice (the view of the slicing plane centred on it);
        the status line's sentence."""
        case = self._require_loaded()
        index, ras = self.next_flagged()
        jump_to(self.scene, ras, slice_normal(case.labels.volume.ijk_to_ras(), case.axis))
        return f"Case {case.case}: flagged slice {index} ({case.cursor + 1} of {len(case.flagged)})."

    # --- decisions -----------------------------------------------------------------------------------

    def decide(self, decision: str) -> str:
        """Accept or reject the loaded case as the batch run left it; the status line's sentence."""
        case = self._require_loaded()
        record_review(self.folder, case.case, decision, None, self.reviewer)
        self.refresh()
        return f"Case {case.case}: {decision}."

    def accept_corrected(self) -> str:
        """The segmentation as edited now, saved as the case's corrected labels; the status line's sentence."""
        case = self._require_loaded()
        if not same_node(self.scene, case.segmentation_node):
            raise InputError(f"the segmentation of case {case.case} is no longer in the scene: select the case again")
        corrected = corrected_labels(case.segmentation_node, case.labels)
        record_review(self.folder, case.case, "corrected", corrected, self.reviewer)
        self.refresh()
        changed = int(np.count_nonzero(corrected.volume.array != case.labels.volume.array))
        return f"Case {case.case}: correction saved ({changed} voxels differ from what was loaded)."

    def library_case(self) -> tuple[Path, Path, str]:
        """(image, labels, name) of the loaded case for a library: only once accepted or corrected."""
        case = self._require_loaded()
        row = self.row(case.case)
        if row is None or row.status not in ACCEPTED:
            raise InputError(f"case {case.case} is not accepted yet: accept it (or save its correction) first")
        files = case_files(self.folder, case.case)
        return files.query, files.corrected or files.result, case.case

    def _require_loaded(self) -> LoadedCase:
        if self.loaded is None:
            raise InputError("select a case in the table first")
        return self.loaded


# --- segmentation -> corrected labels ---------------------------------------------------------------


def corrected_labels(segmentation_node, original: LabelMap) -> LabelMap:
    """The segmentation's segments on ``original``'s grid, each with the original's label value for its
    name (a segment the reviewer added gets the next free value), colours and names as they are now."""
    current = labels_from_segmentation(segmentation_node, original.volume)
    by_name = {s.name: s for s in original.segments}
    free = max(original.values, default=0) + 1
    values = {}
    for segment in current.segments:
        if segment.name in by_name:
            values[segment.value] = by_name[segment.name].value
        else:
            values[segment.value], free = free, free + 1
    dtype = original.volume.array.dtype if free - 1 <= np.iinfo(original.volume.array.dtype).max else np.uint16
    out = np.zeros(original.volume.array.shape, dtype=dtype)
    for old, new in values.items():
        out[current.volume.array == old] = new
    segments = sorted((Segment(values[s.value], s.name, s.color,
                               s.terminology or getattr(by_name.get(s.name), "terminology", None))
                       for s in current.segments), key=lambda s: s.value)
    return original.with_array(out, segments)


# --- slice views -------------------------------------------------------------------------------------


def show_in_slice_views(scene, volume_node) -> None:
    """The volume as the background of every slice view (the composite nodes), as slicer.util's
    setSliceViewerLayers does; the segmentation shows through its own display node."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for n in range(composites.GetNumberOfItems()):
        composites.GetItemAsObject(n).SetBackgroundVolumeID(volume_node.GetID())
    selection = scene.GetFirstNodeByClass("vtkMRMLSelectionNode")
    if selection is not None:
        selection.SetActiveVolumeID(volume_node.GetID())


def slice_normal(ijk_to_ras: np.ndarray, axis: int) -> np.ndarray:
    """Unit world direction across the slices of numpy ``axis`` (k, j, i -> IJK column 2, 1, 0)."""
    column = np.asarray(ijk_to_ras, dtype=float)[:3, 2 - axis]
    return column / np.linalg.norm(column)


def jump_to(scene, ras: tuple[float, float, float], normal: np.ndarray, tolerance: float = 0.99) -> list[str]:
    """Show the world point ``ras``: slice views whose plane is the slicing plane (normal within
    ``tolerance`` of ``normal``) centred on it, the others moved through it; the centred views' names."""
    nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
    centred = []
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        view_normal = [node.GetSliceToRAS().GetElement(r, 2) for r in range(3)]
        if abs(float(np.dot(view_normal, normal))) / max(np.linalg.norm(view_normal), 1e-12) >= tolerance:
            node.JumpSliceByCentering(*ras)
            centred.append(node.GetLayoutName() or node.GetName())
        else:
            node.JumpSliceByOffsetting(*ras)
    return centred


# --- the status line -----------------------------------------------------------------------------------

_IN_USE = re.compile(r"is in use by (.+?) on host")


def review_message(exc: BaseException) -> str:
    """An engine error as one sentence for a reviewer: what happened and what to do, in the panel's words
    (no command line)."""
    text = str(exc).strip()
    in_use = _IN_USE.search(text)
    if in_use:
        return (f"Not saved: the cohort folder is in use by {in_use.group(1)} right now. "
                "Try again when it has finished.")
    if "has no intact result to accept" in text:
        return ("Not saved: this case's result file is missing or was changed since the batch run, "
                "so it cannot be accepted as it is.")
    if "holds no cohort manifest" in text:
        return "This folder holds no batch results: choose the output folder of a batch run."
    if not isinstance(exc, SAM2FewShotError):
        return f"The review step failed: {panel_message(text)}"
    return panel_message(text)


# --- adding a case to a library, on the worker ---------------------------------------------------------


class LibraryAdder:
    """One library add at a time on a worker of its own (the embedding runs there, never in Slicer);
    ``poll()`` from the panel's timer until it gives the outcome."""

    def __init__(self, client_factory: Callable[[], object]):
        self.client_factory = client_factory
        self.client = None
        self.job_id: str | None = None

    @property
    def is_running(self) -> bool:
        return self.job_id is not None

    def start(self, library: str | Path, image: Path, labels: Path, name: str, model=None) -> str:
        """Submit the add; InputError at once for a missing library folder choice."""
        from ..run.protocol import LibraryAdd
        from ..sam2.build import ModelOptions

        if self.is_running:
            raise InputError("a case is being added to the library: wait for it to finish")
        if not str(library).strip():
            raise InputError("choose the library folder to add the case to")
        job = LibraryAdd(id=f"add-{time.time_ns()}", library=str(Path(library).expanduser()),
                         image=str(image), labels=str(labels), name=name, model=model or ModelOptions())
        self.client = self.client or self.client_factory()
        self.client.submit(job)
        self.job_id = job.id
        return job.id

    def poll(self) -> tuple[bool, str] | None:
        """(success, sentence) once the add has ended; None while it runs."""
        if self.job_id is None or self.client is None:
            return None
        for event in self.client.poll():
            if event.get("id") not in (self.job_id, None) or event["event"] not in ("added", "error"):
                continue
            self.job_id = None
            if event["event"] == "added":
                return True, event["message"]
            return False, f"Not added to the library: {panel_message(event['message'])}"
        return None

    def shutdown(self) -> None:
        if self.client is not None:
            self.client.cancel() if self.is_running else self.client.shutdown()
        self.client, self.job_id = None, None
