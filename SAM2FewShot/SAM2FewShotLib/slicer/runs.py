"""The Slicer Logic's run control without Qt: submit a job, pass its events on, insert its result.

The Logic owns a timer that calls ``poll()`` until it returns False; everything else lives here,
so it runs headless (Slicer's real MRML from the slicer-core wheel and a real worker process)
in the tests. The scene is read when a run starts and changed only when its result arrives.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Optional, Sequence

from ..common.errors import InputError
from ..methods.registry import get_method
from ..run.reports import SliceFlag, low_confidence_slices
from . import panel, scene_io
from .panel import PanelChoices

log = logging.getLogger(__name__)


class RunController:
    """One run at a time on a persistent worker; the last result is kept for refining."""

    def __init__(self, scene, client_factory: Callable[[], object],
                 on_progress: Callable[[str, int, int], None] = lambda stage, done, total: None,
                 on_log: Callable[[str], None] = log.info,
                 on_finished: Callable[[bool, str], None] = lambda success, message: None,
                 before_insert: Callable[[object], None] = lambda node: None):
        self.scene = scene
        self.client_factory = client_factory  # the worker client, started on the first job
        self.on_progress, self.on_log, self.on_finished = on_progress, on_log, on_finished
        self.before_insert = before_insert  # e.g. let the Segment Editor save an undo state
        self.client = None
        self.run: Optional[scene_io.PendingRun] = None
        self.last: Optional[scene_io.Inserted] = None
        self.cancelled = False

    @property
    def is_running(self) -> bool:
        return self.run is not None

    def elapsed(self) -> float:
        return 0.0 if self.run is None else time.monotonic() - self.run.start_time

    def start_run(self, choices: PanelChoices, query_node, segmentation_node=None,
                  segment_ids: Optional[Sequence[str]] = None, support_volume_node=None,
                  library_folder: Optional[str] = None, output_node=None, existing: str = "keep") -> str:
        """Read the inputs from the scene and submit the job; InputError before anything starts."""
        if self.is_running:
            raise InputError("a run is in progress: cancel it first")
        unavailable = panel.method_availability().get(choices.method)
        if unavailable:
            raise InputError(f"{get_method(choices.method).label}: {unavailable}")
        inputs = scene_io.gather_inputs(get_method(choices.method), query_node, segmentation_node, segment_ids,
                                            support_volume_node, library_folder)
        return self._submit(choices, query_node, inputs, output_node, existing)

    def can_refine(self) -> bool:
        return self.last is not None and self.scene.GetNodeByID(self.last.output_node_id) is not None

    def start_refine(self, choices: PanelChoices) -> str:
        """Propagate from the slices edited since the last result, along the same axis; replace its segments."""
        if self.is_running or not self.can_refine():
            raise InputError("nothing to refine: run a segmentation first, and let it finish")
        last = self.last
        query_node, output_node, inputs, slices = scene_io.refine_inputs(last, self.scene)
        self.on_log(f"Refining from edited slices {panel.format_slices(slices)}")
        choices = dataclasses.replace(choices, method="propagate", axis=last.axis_choice, slice_range=None)
        return self._submit(choices, query_node, inputs, output_node, "replace", tuple(last.segment_ids))

    def _submit(self, choices, query_node, inputs, output_node, existing, track=()) -> str:
        """The job's files go into a private folder, removed when the run ends however it ends."""
        from ..run.client import JobFolder

        folder = JobFolder()
        try:
            query, prompts, supports = scene_io.write_inputs(inputs, folder.path)
            job_id = f"job-{time.time_ns()}"
            job = panel.build_job(job_id, choices, folder.path, query, prompts, supports, inputs.library)
            self.client = self.client or self.client_factory()
            self.client.submit(job)
        except BaseException:
            folder.remove()
            raise
        self.run = scene_io.PendingRun(job_id, folder, query_node.GetID(), inputs.query,
                                           output_node.GetID() if output_node is not None else None, existing,
                                           choices.axis, tuple(track), time.monotonic())
        self.cancelled = False
        self.on_log(f"Started {get_method(choices.method).label} on '{query_node.GetName()}'"
                    + (f" with {len(supports)} support case(s)" if supports else ""))
        return job_id

    def poll(self) -> bool:
        """Hand the worker's events on (never blocks); False once no run is left to watch."""
        if self.run is None or self.client is None:
            return False
        for event in self.client.poll():
            kind = event["event"]
            if kind == "log":
                self.on_log(f"[{event['level']}] {event['message']}")
            elif event.get("id") not in (self.run.job_id, None):
                continue  # late events of a cancelled job
            elif kind == "progress":
                self.on_progress(event["stage"], event["done"], event["total"])
            elif kind == "result":
                self._finish(event)
                return False
            elif kind == "error":
                self._end(False, f"Segmentation failed: {event['message']}")
                return False
        return True

    def _finish(self, event: dict) -> None:
        """The result into the scene in one step; any failure leaves the scene as it was."""
        from ..run.client import read_result

        try:
            labels, report = read_result(event)
            self.before_insert(self.scene.GetNodeByID(self.run.output_node_id or ""))
            self.last = scene_io.finish_run(self.run, labels, report, self.scene)
        except Exception as exc:  # noqa: BLE001 - one message; the scene unchanged
            log.exception("the result could not be added")
            self._end(False, f"The result could not be added to the scene: {exc}")
            return
        reused = ", warm worker" if event.get("session_reused") else ""
        self._end(True, f"Done in {event['seconds']:.1f} s: {len(labels.segments)} segment(s) in "
                        f"'{self.output_node().GetName()}' ({event['frames_encoded']} slices encoded{reused}).")

    def cancel(self) -> None:
        """Kill the worker's process tree (the next job starts a fresh one); nothing reaches the scene."""
        if self.run is not None:
            self.cancelled = True
            self.client.cancel()
            self._end(False, "Cancelled.")

    def shutdown(self) -> None:
        """Stop the worker (killed when a job runs) and drop the run's files."""
        if self.client is not None:
            if self.is_running:
                self.client.cancel()
            else:
                self.client.shutdown()
        if self.run is not None:
            self.run.folder.remove()
        self.run = None

    def _end(self, success: bool, message: str) -> None:
        if self.run is not None:
            self.run.folder.remove()
        self.run = None
        self.on_finished(success, message)

    # --- the last result -----------------------------------------------------------------------

    def output_node(self):
        return self.scene.GetNodeByID(self.last.output_node_id) if self.last is not None else None

    def low_confidence(self) -> list[SliceFlag]:
        return low_confidence_slices(self.last.report) if self.last is not None else []

    def slice_position(self, index: int) -> tuple[float, float, float]:
        if self.last is None:
            raise InputError("no result yet")
        return scene_io.slice_position(self.last, index)
