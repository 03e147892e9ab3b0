"""Registration in the panel's logic on a fresh Slicer: Apply, Apply again, Undo, with the real worker.

Run by test_bare_slicer.py in a Python limited to what Slicer 5.10 ships (sitecustomize.py here): the
Slicer side (scene, run control) in this process, the worker as the panel starts it. Prints one line
per step; exits non-zero on the first failure.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import slicer

from phantoms import phantom
from SAM2FewShotLib.io.volume import LabelMap
from SAM2FewShotLib.run.client import WorkerClient
from SAM2FewShotLib.slicer.mrml_segments import add_labels_to_segmentation, register_segmentation_converters
from SAM2FewShotLib.slicer.mrml_volume import volume_to_node
from SAM2FewShotLib.slicer.panel import PanelChoices
from SAM2FewShotLib.slicer.runs import RunController

ENGINE_PARENT = Path(__file__).resolve().parents[2] / "SAM2FewShot"


def wait(controller, finished, timeout=300.0):
    deadline = time.monotonic() + timeout
    while controller.poll():
        if time.monotonic() > deadline:
            raise SystemExit("the run did not end in time")
        time.sleep(0.05)
    ok, message = finished[-1]
    if not ok:
        raise SystemExit(f"the run failed: {message}")
    return message


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def cohort(root: Path) -> None:
    """The review section's input: a registration batch through the CLI, quiet (no progress bar library)."""
    from phantoms import write_query_and_support
    from SAM2FewShotLib.cli.main import main as cli

    query, image, labels = write_query_and_support(root, "a.nrrd", "s.nrrd", "s-labels.nrrd")
    (root / "list.csv").write_text(f"query,id\n{query},a\n", encoding="utf-8")
    code = cli(["batch", "--queries", str(root / "list.csv"), "--out", str(root / "out"), "--method", "registration",
                "--support", str(image), str(labels), "-q"])
    assert code == 0 and (root / "out" / "a.nii.gz").is_file(), code
    print("cohort: a registration batch ran")


def main() -> int:
    for absent in ("torch", "sam2", "psutil", "nrrd", "slicerio", "huggingface_hub", "hydra", "tqdm"):
        try:
            __import__(absent)
        except ModuleNotFoundError:
            continue
        raise SystemExit(f"{absent} is importable: this is not a bare Slicer's Python")
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    image, truth = phantom((12, 40, 40), spacing=(1.0, 1.0, 3.0))
    query = volume_to_node(image, scene, "query")
    moved = image.with_array(np.roll(image.array, 2, axis=2))
    support = volume_to_node(moved, scene, "support")
    support_labels = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "support labels")
    ids = add_labels_to_segmentation(support_labels, LabelMap(moved.with_array(np.roll(truth.volume.array, 2, axis=2)),
                                                              truth.segments), support)
    finished = []
    controller = RunController(
        scene, lambda: WorkerClient(python=sys.executable, pythonpath=[ENGINE_PARENT], env=dict(os.environ)),
        on_finished=lambda ok, message: finished.append((ok, message)))
    choices = PanelChoices(method="registration", device="cpu")
    try:
        controller.start_run(choices, query, support_labels, ids, support_volume_node=support)
        print("apply:", wait(controller, finished))
        output = controller.output_node()
        names = [output.GetSegmentation().GetNthSegment(n).GetName()
                 for n in range(output.GetSegmentation().GetNumberOfSegments())]
        assert names == [s.name for s in truth.segments], names
        controller.start_run(choices, query, support_labels, ids, support_volume_node=support)
        message = wait(controller, finished)
        print("apply again:", message)
        assert "replaced" in message, message
        print("undo:", controller.undo())
        print("undo:", controller.undo())
        assert output.GetSegmentation().GetNumberOfSegments() == 0 or scene.GetNodeByID(output.GetID()) is None
        controller.start_run(choices, query, support_labels, ids, support_volume_node=support)
        while controller._preparing is not None and controller.poll():  # until the job is on the worker
            time.sleep(0.01)
        worker = controller.client.pid
        controller.cancel()  # Cancel: the worker's tree is stopped without psutil
        controller.client.join_reapers(5.0)
        assert not _alive(worker), f"the cancelled worker {worker} still runs"
        print("cancel: the worker is gone")
    finally:
        controller.shutdown()
    cohort(Path(sys.argv[1]))
    print("bare Slicer registration walk passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
