"""The panel's *Load example data* without Qt: the demo's public pair fetched by the worker, then put in the scene.

SampleData fetches single files by URL and checksum, but the example is one case pair inside the MSD
hippocampus task, a single tar: so the worker downloads it once into the cache (MD5-checked and unpacked
by io/example_data.py, as the quickstart's demo does), off Slicer's GUI thread, and answers with the
files. The query volume, the support volume and its segmentation then enter the scene together, or
nothing does. Tested headless on Slicer's real MRML with a real worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from ..common.errors import InputError
from ..io.volume import LabelMap
from ..run.protocol import ExampleData, describe_devices
from .mrml_segments import add_labels_to_segmentation, register_segmentation_converters
from .mrml_volume import volume_to_node

log = logging.getLogger(__name__)
BUSY = "A segmentation is running: let it finish or cancel it, then load the example data."
NEXT_STEP = "Choose Matched support or Registration as the method, then Apply."


class ExampleLoad:
    """One *Load example data* request on the panel's worker; ``poll()`` from a timer until it returns False.

    The run controller's worker is used (started now if it has none), so a run after it finds the worker
    warm. The panel keeps the user from starting a run meanwhile (its progress dialog is modal): both
    would read the same event stream.
    """

    def __init__(self, scene, controller, on_log: Callable[[str], None] = log.info):
        if controller.is_running:
            raise InputError(BUSY)
        self.scene, self.on_log = scene, on_log
        self.status = "Starting the background worker..."
        self.nodes: tuple | None = None  # (query volume, support volume, support segmentation) once loaded
        self.message = ""
        self.finished = False
        controller.client = controller.client or controller.client_factory()
        self.client = controller.client
        self.job_id = self.client.submit(ExampleData(id=f"example-{time.time_ns()}"))

    def poll(self) -> bool:
        """Hand the worker's events on (never blocks); False once the nodes are in the scene or it failed."""
        if self.finished:
            return False
        for event in self.client.poll():
            kind = event["event"]
            if kind == "log":
                self.on_log(f"[{event['level']}] {event['message']}")
                if "download" in event["message"]:
                    self.status = "Downloading the example data (once, about 28 MB)..."
            elif kind == "ready":
                self.on_log(f"Background worker ready on {describe_devices(event.get('devices', {}))}")
                self.status = "Getting the example data..."
            elif event.get("id") not in (self.job_id, None):
                continue  # late events of an earlier, cancelled job
            elif kind == "example":
                self._load(event)
                return False
            elif kind == "error":
                self._end(None, f"The example data were not loaded: {event['message']}")
                return False
        return True

    def cancel(self) -> None:
        """Stop the worker (the download with it); nothing enters the scene. The next request starts a new one."""
        if not self.finished:
            self.client.cancel()
            self._end(None, "Cancelled: no example data were loaded.")

    def _load(self, event: dict) -> None:
        try:
            self.nodes = add_example_nodes(self.scene, event)
        except Exception as exc:  # noqa: BLE001 - one message; the scene unchanged
            log.exception("the example data could not be added to the scene")
            self._end(None, f"The example data were downloaded but could not be loaded: {exc}")
            return
        names = ", ".join(self.nodes[2].GetSegmentation().GetNthSegment(n).GetName()
                          for n in range(self.nodes[2].GetSegmentation().GetNumberOfSegments()))
        self._end(self.nodes, f"Loaded the example: query {self.nodes[0].GetName()}, support "
                              f"{self.nodes[1].GetName()} with its segmentation ({names}). {NEXT_STEP}")

    def _end(self, nodes: tuple | None, message: str) -> None:
        self.nodes, self.message, self.finished = nodes, message, True


def add_example_nodes(scene, event: dict) -> tuple:
    """The query volume, the support volume and the support segmentation (named and coloured from the
    task's structures, hidden: it belongs to the support, not to the query shown) from the files of an
    ``example`` event; all three are read first, and a failure removes every node made here."""
    from ..io.volume_io import read_labels, read_volume

    query, support = read_volume(event["query"]), read_volume(event["support"])
    labels = read_labels(event["support_labels"], reference=support)
    names = {int(value): name for value, name in event.get("names", {}).items()}
    labels = LabelMap(labels.volume, tuple(replace(s, name=names.get(s.value, s.name)) for s in labels.segments))
    register_segmentation_converters()
    created: list = []
    try:
        created.append(volume_to_node(query, scene, scene.GenerateUniqueName(event["query_case"])))
        created.append(volume_to_node(support, scene, scene.GenerateUniqueName(event["support_case"])))
        created.append(scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                               scene.GenerateUniqueName(f"{event['support_case']} segmentation")))
        add_labels_to_segmentation(created[2], labels, created[1])
        created[2].GetDisplayNode().SetVisibility(False)
    except BaseException:
        remove_nodes(scene, created)
        raise
    return tuple(created)


def remove_nodes(scene, nodes: list) -> None:
    """The nodes and their display nodes (the scene keeps a removed node's display nodes otherwise)."""
    for node in reversed(nodes):
        for n in reversed(range(node.GetNumberOfDisplayNodes())):
            display = node.GetNthDisplayNode(n)
            if display is not None and display.GetScene() is scene:
                scene.RemoveNode(display)
        scene.RemoveNode(node)
