"""The Slicer Logic's run control without Qt: submit a job, pass its events on, insert its result.

The Logic owns a timer that calls ``poll()`` until it returns False; everything else lives here,
so it runs headless (Slicer's real MRML from the slicer-core wheel and a real worker process)
in the tests. The scene is read when a run starts and changed only when its result arrives.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..common.errors import InputError
from ..io.slicing import plane_of_axis, slicing_axis
from ..methods.registry import get_method
from ..run.protocol import describe_devices
from ..run.reports import SliceFlag, low_confidence_slices, result_axis
from ..sam2.estimate import ESTIMATE_PREFIX
from . import panel, result_segments, scene_io, sequences
from .panel import PanelChoices
from .result_segments import Change
from .undo_store import UndoStore
from .volume_store import Preparation, VolumeStore, grid_of

log = logging.getLogger(__name__)


class RunController:
    """One run at a time on a persistent worker; the last result is kept for refining, the last
    UNDO_DEPTH insertions for undo, on disk (undo_store: a reloaded module's controller finds them).

    Closing the scene cancels the run and forgets every result (the controller watches the scene
    itself, so this holds headless too); a result is inserted only into the very nodes its run
    started with.
    """

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
        self.run: scene_io.PendingRun | None = None
        self.last: scene_io.Inserted | None = None
        self.undo_store = UndoStore(scene)  # insertions that can be undone, on disk
        self.volumes = VolumeStore()  # the volumes handed to the worker, once per volume, in the cache
        self._preparing: Preparation | None = None  # the run's files being written
        self._last_entry: Path | None = None  # the undo entry of ``last``
        self.cancelled = False
        self.estimate = ""  # shown beside the progress: "Expected time: about 8 min more on this CPU ..."
        self.show_3d = False
        self._close_observer = scene.AddObserver(scene.StartCloseEvent, self._on_scene_close)

    @property
    def is_running(self) -> bool:
        return self.run is not None

    def elapsed(self) -> float:
        return 0.0 if self.run is None else time.monotonic() - self.run.start_time

    def check_run(self, choices: PanelChoices, query_node, segmentation_node=None,
                  segment_ids: Sequence[str] | None = None, support_volume_node=None,
                  library_folder: str | None = None, prompt_points=None, prompt_boxes: Sequence = ()
                  ) -> scene_io.RunInputs:
        """The run's inputs read from the scene: InputError now, before any install or download. Propagate
        also takes a Markups point list and ROIs (markups_prompts.py)."""
        if self.is_running:
            raise InputError("a run is in progress: cancel it first")
        unavailable = panel.method_availability().get(choices.method)
        if unavailable:
            raise InputError(f"{get_method(choices.method).label}: {unavailable}")
        if choices.slice_range is not None and choices.slice_range[0] > choices.slice_range[1]:
            first, last = choices.slice_range
            raise InputError(f"the slice range starts after it ends ({first} > {last}): correct it under Advanced")
        return scene_io.gather_inputs(get_method(choices.method), query_node, segmentation_node, segment_ids,
                                      support_volume_node, library_folder, prompt_points, prompt_boxes, choices.axis)

    def start_run(self, choices: PanelChoices, query_node, segmentation_node=None,
                  segment_ids: Sequence[str] | None = None, support_volume_node=None,
                  library_folder: str | None = None, output_node=None,
                  inputs: scene_io.RunInputs | None = None, prompt_points=None, prompt_boxes: Sequence = ()) -> str:
        """Submit the job (inputs read now unless ``check_run`` gave them); InputError before anything starts.

        The result goes into ``output_node``, or the query's own output segmentation when None.
        """
        inputs = inputs or self.check_run(choices, query_node, segmentation_node, segment_ids, support_volume_node,
                                          library_folder, prompt_points, prompt_boxes)
        axis = slicing_axis(inputs.query, inputs.plane if choices.axis == "auto" else choices.axis)
        return self._submit(choices, query_node, inputs, output_node, scene_io.prompt_slices_of(inputs, axis))

    def can_refine(self) -> bool:
        return (self.last is not None and not self.is_running
                and result_segments.same_node(self.scene, self.last.output_node)
                and result_segments.same_node(self.scene, self.last.query_node))

    def start_refine(self, choices: PanelChoices) -> str:
        """Propagate the corrected segments from all their prompt slices; replace those segments only."""
        if self.is_running or self.last is None:
            raise InputError("nothing to refine: run a segmentation first, and let it finish")
        last = self.last
        inputs, targets, prompt_slices, corrected = scene_io.refine_inputs(last, self.scene)
        names = ", ".join(s.name for s in inputs.prompts.segments)
        self.on_log(f"Refining {names} from corrected slices {panel.format_slices(corrected)}")
        plane = plane_of_axis(last.query, result_axis(last.report, last.query)) or "auto"
        choices = dataclasses.replace(choices, method="propagate", slice_range=None, axis=plane)
        return self._submit(choices, last.query_node, inputs, last.output_node, prompt_slices, targets)

    def _submit(self, choices, query_node, inputs, output_node, prompt_slices, targets=None) -> str:
        """The run starts now; its files are written on a thread (a big volume takes seconds, once per volume:
        volume_store.py) and the job goes to the worker from poll() once they are. The run keeps the query's
        grid only: the voxels are on disk, and in memory only until written."""
        from ..run.client import JobFolder

        folder = JobFolder()
        job_id = f"job-{time.time_ns()}"
        self.run = scene_io.PendingRun(job_id, folder, self.scene, query_node, grid_of(inputs.query), output_node,
                                       prompt_slices, targets, time.monotonic(), inputs.frame, inputs.slice_bounds)
        bounds = inputs.slice_bounds_text()
        params = {k: v for k, v in (("mask_slices", inputs.mask_slices), ("slice_bounds", bounds)) if v} or None
        self._preparing = Preparation(lambda: panel.build_job(
            job_id, choices, folder.path, *scene_io.write_inputs(inputs, folder.path, self.volumes), inputs.library,
            params, input_notes=inputs.notes, prompts=scene_io.write_prompts(inputs, folder.path)))
        self.cancelled = False
        self.estimate = ""  # the engine's expected time for this run, once it has timed a few slices
        supports = f" with {len(inputs.supports)} support case(s)" if inputs.supports or inputs.library else ""
        self.on_log(f"Started {get_method(choices.method).label} on '{query_node.GetName()}'{supports}")
        return job_id

    def _send_prepared(self) -> bool:
        """The job to the worker once its files are written; False when the run ended (its files failed)."""
        job, problem = self._preparing.outcome()
        self._preparing = None
        if problem is not None:
            self._end(False, f"The run could not start: {problem}")
            return False
        try:
            self.client = self.client or self.client_factory()
            self.client.submit(job)
        except Exception as exc:  # noqa: BLE001 - a worker that cannot start: one message, the scene as it was
            self._end(False, f"The run could not start: {exc}")
            return False
        return True

    def poll(self) -> bool:
        """Hand the worker's events on (never blocks); False once no run is left to watch."""
        if self.run is None:
            return False
        if self._preparing is not None:
            if not self._preparing.done():
                return True
            if not self._send_prepared():
                return False
        for event in self.client.poll():
            kind = event["event"]
            if kind == "log":
                self.on_log(f"[{event['level']}] {event['message']}")
                if event["message"].startswith(ESTIMATE_PREFIX):  # shown beside the progress from now on
                    self.estimate = panel.panel_message(event["message"])
            elif kind == "ready":
                self.on_log(f"Background worker ready on {describe_devices(event.get('devices', {}))}")
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

        run = self.run
        try:
            labels, report = read_result(event)
            output = run.output_node if run.output_node is not None else result_segments.find_output(
                run.query_node, sequences.time_point_of(run.frame)[0] if run.frame else None)
            self.before_insert(output)
            inserted = scene_io.finish_run(run, labels, report, self.last, self.show_3d, run.job_id)
        except Exception as exc:  # noqa: BLE001 - one message; the scene unchanged
            log.exception("the result could not be added")
            self._end(False, f"The result was not added: {exc}")
            return
        self.last = inserted
        self._last_entry, undo_note = self._keep_for_undo(inserted.change)
        reused = ", warm worker" if event.get("session_reused") else ""
        self._end(True, f"Done in {event['seconds']:.1f} s ({event['frames_encoded']} slices encoded{reused}). "
                        f"{inserted.change.message()}{panel.not_found_message(report)}{undo_note}")

    def _keep_for_undo(self, change: Change) -> tuple[Path | None, str]:
        """The change's snapshots to the undo store on disk, then out of memory; a note when that failed."""
        try:
            return self.undo_store.push(change.node, change.created, change.added, change.saved), ""
        except (OSError, InputError) as exc:  # the result stays; only its undo is lost
            log.warning("the undo data could not be saved: %s", exc)
            return None, f" Undo is not available for this run ({exc})."
        finally:
            change.release()

    @property
    def changes(self) -> list[Path]:
        """The undo entries (folders on disk), the latest last."""
        return self.undo_store.entries()

    def can_undo(self) -> bool:
        return not self.is_running and bool(self.changes)

    def undo(self) -> str:
        """Take the latest insertion back (whether or not the Segment Editor is open, and after a
        module reload too); the message."""
        entries = self.changes if not self.is_running else []
        if not entries:
            raise InputError("nothing to undo")
        if self.last is not None and entries[-1] == self._last_entry:
            self.last = None  # its labels are gone: refining would compare with what is no longer there
        return self.undo_store.undo()

    def cancel(self, message: str = "Cancelled.") -> None:
        """Kill the worker's process tree in the background (the next job starts a fresh one); the
        call returns at once and nothing of the run reaches the scene."""
        if self.run is not None:
            self.cancelled = True
            if self._preparing is None:  # sent: the worker is killed (while writing its files, it is never sent)
                self.client.cancel()
            self._end(False, message)

    def forget(self) -> None:
        """Drop every result, the undo history and the volumes' files on disk: a closed scene leaves nothing."""
        self.last = None
        self._last_entry = None
        self.undo_store.clear()
        self.volumes.clear()

    def _on_scene_close(self, caller=None, event=None) -> None:
        self.cancel("Cancelled: the scene was closed.")
        self.forget()

    def shutdown(self) -> None:
        """Stop the worker (killed when a job runs), drop the run's files, stop watching the scene."""
        if self.client is not None:
            if self.is_running and self._preparing is None:
                self.client.cancel()
            else:
                self.client.shutdown()
        self._drop_run_files()
        self.run, self._preparing = None, None
        self.volumes.clear()
        if self._close_observer is not None:
            self.scene.RemoveObserver(self._close_observer)
            self._close_observer = None

    def _end(self, success: bool, message: str) -> None:
        self._drop_run_files()
        self.run, self._preparing = None, None
        self.on_finished(success, message)

    def _drop_run_files(self) -> None:
        """The run's job folder goes, once its files are no longer being written (never under the writer)."""
        if self.run is not None and self._preparing is not None:
            self._preparing.drop(self.run.folder.remove)
        elif self.run is not None:
            self.run.folder.remove()

    # --- the last result -----------------------------------------------------------------------

    def output_node(self):
        return self.last.output_node if self.last is not None else None

    def low_confidence(self) -> list[SliceFlag]:
        return low_confidence_slices(self.last.report) if self.last is not None else []

    def slice_position(self, index: int) -> tuple[float, float, float]:
        if self.last is None:
            raise InputError("no result yet")
        return scene_io.slice_position(self.last, index)
