"""The Segment Editor effect's live session without Qt: clicks in, masks into the user's segment, Propagate.

A click in world (RAS) coordinates on a slice view becomes (slice, column, row) of the session's slices
(click_geometry.py) and goes to the worker's live session (session_link.py: one session on the panel's own
worker, the volume handed over once); its mask, when the worker answers (``poll``, never blocking),
replaces that slice of the selected segment and nothing else (segment_slices.py). Propagate first sends
the slices the user drew or corrected since (click_prompts.py keeps which slices are the user's), then
fills every prompted segment both ways and writes it into those segments (the user's own: what they
asked for); slices that propagation filled are not the user's for the next Propagate.
``before_change(segmentation_node)`` is called before every change (the effect saves the Segment
Editor's undo state there, so Ctrl+Z takes the change back).

The session axis is the one of the view first clicked in. A view of another orientation is refused in
one sentence while prompts exist; with none (at the start, or after Clear prompts) the session is opened
again on the view's axis. An oblique view is always refused. The session ends when the volume changes
(another node, new voxels or geometry, another model or normalisation in the panel), when the scene
closes, on ``close()`` (the effect calls it some minutes after it is left, and switching effects to draw
a correction costs nothing) and on ``shutdown()``; it leaves no file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from ..common.errors import InputError
from ..run import session_protocol as sp
from . import click_geometry as geo
from .click_prompts import Mark, SegmentRecord
from .mrml_volume import node_ijk_to_ras, volume_from_node
from .panel import PanelChoices, format_slices, model_options, slice_digests
from .segment_slices import read_segment, read_slice, slice_digest, write_slice, write_volume_mask
from .session_link import SessionLink, SessionVolume
from .volume_store import grid_of

log = logging.getLogger(__name__)

PANEL_RUNNING = "a segmentation is running in the panel: wait for it or cancel it"
RELEASE_AFTER_S = 300.0  # the effect closes the session this long after it was left


class ClickSession(SessionLink):
    """The SAM2 effect's clicks, prompts and propagations on one live session; its timer calls ``poll()``."""

    def __init__(self, scene, runs, choices: Callable[[], PanelChoices] = PanelChoices,
                 before_change: Callable[[object], None] = lambda node: None,
                 on_message: Callable[[str], None] = log.info, pause_s: float | None = None):
        super().__init__(runs, on_message, pause_s)
        self.scene, self.choices, self.before_change = scene, choices, before_change
        self.records: dict[tuple[str, str], SegmentRecord] = {}
        self.last_mask: dict | None = None  # the last mask event, without its bits
        self._generation = 0  # Clear prompts and close make older answers stale
        self._next_object = 1
        self._observer = scene.AddObserver(scene.StartCloseEvent, lambda *a: self.close("the scene was closed"))

    @property
    def axis(self) -> int | None:
        return None if self.volume is None else self.volume.axis

    def user_slices(self, seg_node, segment_id: str) -> dict[int, str]:
        """slice -> "click" | "drawn": the segment's prompts for the next Propagate (as last reviewed)."""
        record = self.records.get((seg_node.GetID(), segment_id))
        return {} if record is None else record.user_slices()

    def marks(self, seg_node, segment_id: str) -> list[Mark]:
        """The segment's points and boxes since the last Clear, to show in the views: those of a click on its
        way, and of slices still as their last click left them (a click taken back with Ctrl+Z, or drawn
        over, shows no point)."""
        record = self.records.get((seg_node.GetID(), segment_id)) if seg_node is not None else None
        if record is None or self.volume is None or not _has_segment(record):
            return []
        shown = set()
        for t in {m.t for m in record.marks}:
            prompt = record.prompts.get(t)
            if prompt is None or (prompt.source == "click" and prompt.digest == self._slice_digest(record, t)):
                shown.add(t)
        return [m for m in record.marks if m.t in shown]

    # ---------------------------------------------------------------------------- the user's actions

    def click(self, volume_node, seg_node, segment_id: str, slice_to_ras, ras, include: bool = True):
        """An include (or exclude) point at world position ``ras`` on the view; its SlicePoint."""
        volume, record, point = self._target(volume_node, seg_node, segment_id, slice_to_ras, ras)
        self._since_click(record, point.t)
        record.marks.append(Mark("include" if include else "exclude", point.t, tuple(map(float, ras[:3]))))
        self._click(record, point.t, points=((point.x, point.y, int(include)),))
        return point

    def box(self, volume_node, seg_node, segment_id: str, slice_to_ras, ras_a, ras_b):
        """A box dragged between two world positions on the view: the slice starts afresh from it."""
        volume, record, a = self._target(volume_node, seg_node, segment_id, slice_to_ras, ras_a)
        t, box = geo.box_on_slice(a, geo.to_slice(ras_b, volume.grid.ijk_to_ras(), volume.axis,
                                                  volume.grid.array.shape))
        self._since_click(record, t, refine=False)
        record.marks[:] = [m for m in record.marks if m.t != t]
        record.marks.append(Mark("box", t, tuple(map(float, ras_a[:3])), tuple(map(float, ras_b[:3]))))
        self._click(record, t, box=box)
        return t, box

    def propagate(self) -> None:
        """Fill every prompted segment both ways from its user slices (drawn ones are sent first)."""
        self._check_panel()
        volume = self.volume
        if volume is None or volume.axis is None or not self.records:
            raise InputError("nothing to propagate yet: click on a slice of the segment first")
        if self.pending(("propagate",)):
            raise InputError("a propagation is already running")
        before = {}
        for key, record in list(self.records.items()):
            if not _has_segment(record):
                self._drop(key)
                continue
            if not record.prompts:  # not prompted since Clear prompts: not part of this propagation
                continue
            review = record.review(read_segment(record.node, record.segment_id, volume.grid), volume.axis)
            for t in review.cleared:  # undone (Ctrl+Z): no longer a prompt
                self.send("clear", lambda i, s, o=record.obj, t=t: sp.SessionClear(id=i, session=s, object=o, slice=t))
            for t, mask in review.drawn.items():
                self.send("mask", lambda i, s, o=record.obj, t=t, m=mask: sp.SessionMask(
                    id=i, session=s, slice=t, object=o, shape=m.shape, bits=sp.pack_mask(m)))
            if record.prompts:  # all of them undone: it is not propagated, and stays as it is
                before[record.obj] = review.digests
        if not before:
            raise InputError("nothing to propagate yet: click on a slice of the segment first")
        from ..run.client import JobFolder

        folder = JobFolder()
        self.send("propagate", lambda i, s: sp.SessionPropagate(id=i, session=s, out=str(folder.labels),
                                                                report=str(folder.report)),
                  data={"folder": folder, "before": before, "start": time.monotonic()})
        self.say("Propagating " + ", ".join(_name(r) for r in self.records.values() if r.obj in before) + "...")

    def clear(self) -> None:
        """Forget every prompt (the segments keep their voxels): no slice is the user's any more."""
        self._generation += 1
        if self.opening:
            self.send("clear", lambda i, s: sp.SessionClear(id=i, session=s))
        for key, record in list(self.records.items()):
            if not _has_segment(record):
                self._drop(key)
                continue
            mask = read_segment(record.node, record.segment_id, self.volume.grid)
            record.forget_prompts(slice_digests(mask, self.volume.axis))
        self.say("Prompts cleared")

    def close(self, reason: str = "") -> None:
        """End the session: the worker frees it, its volume file is removed, the records are forgotten."""
        session = self.end()
        self.records = {}
        self._generation += 1
        if reason and session:
            self.say(f"SAM2 session closed: {reason}")

    def shutdown(self) -> None:
        self.close()
        if self._observer is not None:
            self.scene.RemoveObserver(self._observer)
            self._observer = None

    # ---------------------------------------------------------------------------- clicks

    def _check_panel(self) -> None:
        if self.runs.is_running:
            raise InputError(PANEL_RUNNING)

    def _target(self, volume_node, seg_node, segment_id: str, slice_to_ras, ras):
        """The session's volume (opened on the view's axis if need be), the segment's record, the point."""
        self._check_panel()
        if seg_node is None or seg_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError("select a segment to click for")
        volume = self._volume_for(volume_node)
        shown = geo.view_axis(slice_to_ras, volume.grid.ijk_to_ras())
        if volume.axis is not None and shown != volume.axis:
            if shown is None or any(r.prompts for r in self.records.values()) or self.pending():
                raise InputError(geo.refusal_for_view(volume.grid, volume.axis, shown))
            self.close()  # nothing prompted yet: open again on this view's axis
            volume = self._volume_for(volume_node)
        if volume.axis is None:
            if shown is None or geo.plane_for_axis(volume.grid, shown) is None:
                raise InputError(geo.refusal_for_view(volume.grid, shown or 0, None))
            volume.axis = shown
        point = geo.to_slice(ras, volume.grid.ijk_to_ras(), volume.axis, volume.grid.array.shape)
        if not self.opening:
            self.open(point.t)
        return volume, self._record(seg_node, segment_id), point

    def _volume_for(self, node) -> SessionVolume:
        """The session's volume; a changed one ends the session first."""
        if node is None:
            raise InputError("select the volume to segment (the Segment Editor's source volume)")
        choices = self.choices()
        image = node.GetImageData()
        key = (node.GetID(), image.GetMTime() if image is not None else 0, tuple(node_ijk_to_ras(node).ravel()))
        state, model = self.volume, model_options(choices)
        if state is not None and (state.node is not node or state.key != key or state.model != model
                                  or state.normalization != choices.normalization):
            self.close("the volume or the model changed")
            state = None
        if state is None:
            volume = volume_from_node(node)
            state = self.volume = SessionVolume(node, key, grid_of(volume), model, choices.normalization,
                                                voxels=volume)
        return state

    def _record(self, seg_node, segment_id: str) -> SegmentRecord:
        key = (seg_node.GetID(), segment_id)
        if key not in self.records:
            shape, axis = self.volume.grid.array.shape, self.volume.axis
            empty = slice_digest(np.zeros([n for a, n in enumerate(shape) if a != axis], dtype=bool))
            self.records[key] = SegmentRecord(seg_node, segment_id, self._next_object, shape[axis], empty)
            self._next_object += 1
        return self.records[key]

    def _slice_digest(self, record: SegmentRecord, t: int) -> bytes:
        return slice_digest(read_slice(record.node, record.segment_id, self.volume.grid, self.volume.axis, t))

    def _since_click(self, record: SegmentRecord, t: int, refine: bool = True) -> None:
        """Before a click on slice ``t``: what the user did there since the last click reaches the worker
        first. Taken back with Ctrl+Z, the worker forgets those clicks (the new one starts afresh); drawn
        over, the drawing is the mask the click refines (a box starts afresh anyway: ``refine`` False)."""
        if t not in record.prompts or not self.is_open:  # not open: a reopened session gets the slices as masks
            return
        mask = read_slice(record.node, record.segment_id, self.volume.grid, self.volume.axis, t)
        change = record.since_click(t, slice_digest(mask))
        if change == "undone" or (change == "drawn" and not refine):
            self.send("clear", lambda i, s, o=record.obj: sp.SessionClear(id=i, session=s, object=o, slice=t))
        elif change == "drawn":
            self.send("mask", lambda i, s, o=record.obj, m=mask: sp.SessionMask(
                id=i, session=s, slice=t, object=o, shape=m.shape, bits=sp.pack_mask(m)))

    def _click(self, record: SegmentRecord, t: int, points=(), box=None) -> None:
        self.send("click", lambda i, s: sp.SessionClick(id=i, session=s, slice=t, object=record.obj, points=points,
                                                        box=box),
                  record=record, data={"generation": self._generation})

    def _drop(self, key) -> None:
        record = self.records.pop(key)
        if self.session_id:
            self.send("clear", lambda i, s, o=record.obj: sp.SessionClear(id=i, session=s, object=o))

    # ---------------------------------------------------------------------------- answers

    def answered(self, request, event: dict) -> None:
        if request.kind == "click":
            self._on_mask(request, event)
        elif request.kind == "propagate":
            self._on_result(request, event)

    def restore_masks(self):
        for record in self.records.values():
            if _has_segment(record):
                for t in record.prompts:
                    yield record.obj, t, read_slice(record.node, record.segment_id, self.volume.grid,
                                                    self.volume.axis, t)

    def _on_mask(self, request, event: dict) -> None:
        """The click's mask replaces that slice of the segment (and nothing else)."""
        record = request.record
        if request.data.get("generation") != self._generation or not _has_segment(record):
            return  # prompts cleared (or the segment deleted) since the click
        volume, t = self.volume, event["slice"]
        mask = sp.unpack_mask(event["bits"], event["shape"])
        prior = slice_digest(read_slice(record.node, record.segment_id, volume.grid, volume.axis, t))
        self.before_change(record.node)
        write_slice(record.node, record.segment_id, volume.grid, volume.axis, t, mask)
        record.clicked(t, prior, slice_digest(read_slice(record.node, record.segment_id, volume.grid, volume.axis, t)))
        self.last_mask = {k: v for k, v in event.items() if k != "bits"}
        self.say(f"{_name(record)}, slice {t}: {event['voxels']} voxels ({event['decoder_ms']:.0f} ms"
                 + (", slice encoded first" if event["encoded_now"] else "") + ")")

    def _on_result(self, request, event: dict) -> None:
        """The propagation's labels into the prompted segments, one undo state per segmentation."""
        from ..run.client import read_result

        try:
            labels, _ = read_result(event)
        finally:
            request.data["folder"].remove()
        volume, saved, names = self.volume, set(), []
        for record in self.records.values():
            before = request.data["before"].get(record.obj)
            if before is None or not _has_segment(record):
                continue
            if record.node.GetID() not in saved:
                self.before_change(record.node)
                saved.add(record.node.GetID())
            write_volume_mask(record.node, record.segment_id, volume.grid, labels.volume.array == record.obj)
            record.propagated(before, slice_digests(read_segment(record.node, record.segment_id, volume.grid),
                                                    volume.axis))
            names.append(f"{_name(record)} (from slices {format_slices(sorted(record.prompts))})")
        self.say(f"Propagated {', '.join(names)} in {time.monotonic() - request.data['start']:.1f} s")


def _has_segment(record: SegmentRecord) -> bool:
    node = record.node
    return node is not None and node.GetScene() is not None and \
        node.GetSegmentation().GetSegment(record.segment_id) is not None


def _name(record: SegmentRecord) -> str:
    return record.node.GetSegmentation().GetSegment(record.segment_id).GetName()
