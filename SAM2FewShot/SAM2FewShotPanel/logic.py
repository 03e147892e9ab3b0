"""The panel's Logic and parameter node: settings, first-use setup, runs on the background worker.

Qt and Slicer are used here (timers, settings, pip, the Segment Editor); everything that can be
done without them lives in SAM2FewShotLib.slicer (runs.RunController, tested headless).
"""

import dataclasses
import enum
import logging
import os
import shutil
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from SAM2FewShotLib.common.cache import CACHE_ENV, cache_dir
from SAM2FewShotLib.common.choices import RESERVED_CORES_ENV
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.methods.registry import METHODS, get_method
from SAM2FewShotLib.run import job_folders
from SAM2FewShotLib.sam2 import models, weights
from SAM2FewShotLib.slicer import example_data, install, panel, runs, volume_store
from SAM2FewShotLib.slicer.low_confidence import LowConfidenceRows
from SAM2FewShotLib.slicer.panel import PanelChoices

SETTINGS = "SAM2FewShot/"
# The folder holding SAM2FewShot.py and the engine package SAM2FewShotLib: the worker's PYTHONPATH.
MODULE_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_MS = 100
# The panel's last choices, remembered across sessions (QSettings) for a new scene's parameter node.
REMEMBERED = ("method", "model", "device", "precision", "axis", "normalization", "scheme", "augmentations", "topK",
              "supportFromLibrary", "libraryFolder", "show3D")


class _MethodEnum(enum.Enum):
    def label(self) -> str:  # the combo box shows this (parameterNodeWrapper's enum connector)
        return get_method(self.value).label


MethodChoice = _MethodEnum("MethodChoice", [(key.replace("-", "_"), key) for key in METHODS])


@parameterNodeWrapper
class SAM2FewShotParameterNode:
    """The panel's state in the scene. Widgets with a SlicerParameterName in the .ui are bound by
    connectGui; the rest (radio buttons, the library folder, the editable normalisation box, the
    segment checklist, the ROI checklist) are set by hand when the user has finished editing, so no edit is undone."""

    queryVolume: vtkMRMLScalarVolumeNode
    supportVolume: vtkMRMLScalarVolumeNode
    supportSegmentation: vtkMRMLSegmentationNode
    outputSegmentation: vtkMRMLSegmentationNode  # None: the query's own result segmentation
    promptPoints: vtkMRMLMarkupsFiducialNode  # propagate: include (selected) and exclude points (markups_prompts)
    promptBoxes: list[vtkMRMLMarkupsROINode]  # propagate: one ROI per segment, checked in a checkable combo box
    method: MethodChoice = MethodChoice(PanelChoices.method)
    model: Annotated[str, Choice(list(models.REGISTRY))] = models.DEFAULT_MODEL
    device: Annotated[str, Choice(list(panel.DEVICES))] = PanelChoices.device
    precision: Annotated[str, Choice(list(panel.PANEL_PRECISIONS))] = PanelChoices.precision
    scheme: Annotated[str, Choice(list(panel.SCHEMES))] = PanelChoices.scheme
    axis: Annotated[str, Choice(list(panel.AXES))] = PanelChoices.axis
    augmentations: Annotated[int, WithinRange(1, 64)] = PanelChoices.augmentations
    topK: Annotated[int, WithinRange(1, 20)] = PanelChoices.top_k
    useSliceRange: bool = False
    firstSlice: Annotated[int, WithinRange(0, 99999)] = 0
    lastSlice: Annotated[int, WithinRange(0, 99999)] = 0
    show3D: bool = False
    supportFromLibrary: bool = False
    libraryFolder: str = ""
    normalization: str = PanelChoices.normalization
    excludedSegments: str = ""  # ids of unchecked support segments, comma-separated


class SAM2FewShotLogic(ScriptedLoadableModuleLogic):
    """Settings, first-use setup, and runs on the background worker (runs.RunController)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.progressCallback = lambda stage, done, total: None
        self.logCallback = logging.info
        self.finishedCallback = lambda success, message: None
        self.developerChoices = {}
        self.runs = runs.RunController(
            slicer.mrmlScene, self._workerClient, lambda *a: self.progressCallback(*a), lambda t: self.logCallback(t),
            self._onFinished, self._saveEditorUndoState)
        self.lowConfidence = LowConfidenceRows(self.runs)  # the table's rows, tied to the result they list
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.poll)
        os.environ.setdefault(CACHE_ENV, self.cacheFolder())
        # A crashed Slicer's job folders, once per process: small ones in the temp folder, volumes in the cache.
        job_folders.sweep_in_background(None, volume_store.jobs_root())

    # --- parameters and settings ---------------------------------------------------------------

    def getParameterNode(self):
        """The scene's parameter node; a new one starts from the last choices (QSettings)."""
        node = super().getParameterNode()
        fresh = not node.GetParameterNames()
        wrapped = SAM2FewShotParameterNode(node)
        if fresh:
            settings = qt.QSettings()
            for name in REMEMBERED:
                value = settings.value(SETTINGS + name)
                if value is not None:
                    try:
                        setattr(wrapped, name, panel.remembered_value(value, getattr(wrapped, name)))
                    except (ValueError, TypeError):  # a choice this version no longer has
                        pass
        return wrapped

    def choices(self, p) -> PanelChoices:
        """The run options; ``developerChoices`` (e.g. random weights in the self-test) override them."""
        choices = PanelChoices(method=p.method.value, model=p.model, device=p.device, precision=p.precision,
                               axis=p.axis,
                               normalization=p.normalization, scheme=p.scheme, augmentations=p.augmentations,
                               top_k=p.topK, slice_range=(p.firstSlice, p.lastSlice) if p.useSliceRange else None)
        return dataclasses.replace(choices, **self.developerChoices)

    def saveSettings(self, p):
        settings = qt.QSettings()
        for name in REMEMBERED:
            value = getattr(p, name)
            settings.setValue(SETTINGS + name, value.value if isinstance(value, enum.Enum) else str(value))

    def cacheFolder(self) -> str:
        return qt.QSettings().value(SETTINGS + "CacheFolder") or str(cache_dir())

    def setCacheFolder(self, path):
        if not path or path == os.environ.get(CACHE_ENV):
            return
        qt.QSettings().setValue(SETTINGS + "CacheFolder", path)
        os.environ[CACHE_ENV] = path
        if self.runs.client is not None:  # the next worker uses the new folder
            self.runs.client.base_env[CACHE_ENV] = path
            if not self.isRunning:
                self.runs.client.shutdown()

    # --- first use: packages and weights --------------------------------------------------------

    def ensureDependencies(self, needsModel, confirm, onStart=lambda: None) -> bool:
        """Install missing packages once ``confirm(question)`` agrees; False when the user declines.
        ``onStart`` is called once installing has begun (the panel locks itself then)."""
        return install.ensure_installed(needsModel, confirm, slicer.util.pip_install, self.installTorch,
                                        self.logCallback, (slicer.app.majorVersion, slicer.app.minorVersion),
                                        on_start=onStart)

    def installTorch(self, problem):
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise InputError("SAM2FewShot needs the PyTorch extension: install it from the Extensions Manager, "
                             "restart 3D Slicer and try again") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            raise InputError(f"{problem}: update it in the PyTorch Util module (version "
                             f"{install.TORCH_REQUIREMENT}) and restart 3D Slicer")
        self.logCallback("Installing PyTorch through the PyTorch extension (this may take several minutes)...")
        if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=install.TORCH_REQUIREMENT) is None:
            raise InputError("PyTorch was not installed, and SAM2FewShot needs it")

    def isModelCached(self, name) -> bool:
        return weights.is_cached(name)

    def modelStatus(self, name) -> str:
        return "Weights are in the cache." if self.isModelCached(name) else "Weights are downloaded on first use."

    def importCheckpoint(self, name, path):
        """Offline sites: a checkpoint file copied into the cache once its SHA-256 matches."""
        return weights.import_checkpoint(name, path)

    # --- runs -------------------------------------------------------------------------------------

    @property
    def isRunning(self) -> bool:
        return self.runs.is_running

    @property
    def cancelled(self) -> bool:
        return self.runs.cancelled

    @property
    def lastResult(self):
        return self.runs.last

    def elapsed(self) -> float:
        return self.runs.elapsed()

    @property
    def estimate(self) -> str:
        """The engine's expected time for the run, once it has timed its first slices ('' until then)."""
        return self.runs.estimate

    def checkRun(self, choices, queryNode, supportSegmentationNode=None, segmentIds=None, supportVolumeNode=None,
                 libraryFolder=None, promptPoints=None, promptBoxes=()):
        """The run's inputs read from the scene; InputError before anything is installed or started."""
        return self.runs.check_run(choices, queryNode, supportSegmentationNode, segmentIds, supportVolumeNode,
                                   libraryFolder, promptPoints, [node for node in promptBoxes if node is not None])

    def startRun(self, choices, queryNode, supportSegmentationNode=None, segmentIds=None, supportVolumeNode=None,
                 libraryFolder=None, outputSegmentationNode=None, inputs=None) -> str:
        """Submit the job; the scene is not touched until it succeeds."""
        jobId = self.runs.start_run(choices, queryNode, supportSegmentationNode, segmentIds, supportVolumeNode,
                                    libraryFolder, outputSegmentationNode, inputs)
        self._timer.start()
        return jobId

    def canRefine(self) -> bool:
        return self.runs.can_refine()

    def startRefine(self, choices) -> str:
        """Propagate the corrected segments from their prompt and corrected slices; replace only those."""
        jobId = self.runs.start_refine(choices)
        self._timer.start()
        return jobId

    def canUndo(self) -> bool:
        return self.runs.can_undo()

    def undo(self) -> str:
        return self.runs.undo()

    def loadExampleData(self, dialog, onFinished):
        """The example pair fetched by the worker (example_data.ExampleLoad), polled by a timer: ``dialog``, a
        modal QProgressDialog (no run starts meanwhile), shows its status and cancels it; ``onFinished(nodes,
        message)`` at the end, nodes None unless the three nodes are in the scene."""
        load, timer = example_data.ExampleLoad(slicer.mrmlScene, self.runs, self.logCallback), qt.QTimer()

        def poll():
            if dialog.wasCanceled:
                load.cancel()
            if load.poll():
                dialog.setLabelText(load.status)
                return
            timer.stop()
            self._exampleLoad = None
            onFinished(load.nodes, load.message)

        timer.connect("timeout()", poll)
        timer.start(POLL_MS)
        self._exampleLoad = (load, timer)  # kept alive until it ends
        return load

    def poll(self):
        """Timer slot: the worker's events, without ever blocking."""
        if not self.runs.poll():
            self._timer.stop()

    def cancel(self):
        """Kill the worker's process tree in the background; nothing of the run reaches the scene."""
        self._timer.stop()
        self.runs.cancel()

    def shutdown(self):
        self._timer.stop()
        if getattr(self, "clickSession", None) is not None:  # the SAM2 effect's live session (SAM2FewShotEffect/)
            self.clickSession.shutdown()
        self.runs.shutdown()

    def _onFinished(self, success, message):
        self._timer.stop()
        self.finishedCallback(success, message)

    @staticmethod
    def _workerClient():
        from SAM2FewShotLib.run.client import WorkerClient

        python = shutil.which("PythonSlicer")
        if python is None:
            raise InputError("PythonSlicer was not found: the background worker cannot start")
        environment = slicer.util.startupEnvironment()
        environment[CACHE_ENV] = os.environ[CACHE_ENV]
        environment[RESERVED_CORES_ENV] = "1"  # torch in the worker leaves one core to Slicer
        return WorkerClient(python=python, pythonpath=[MODULE_FOLDER], env=environment)

    @staticmethod
    def _saveEditorUndoState(segmentationNode):
        """When the Segment Editor edits this segmentation, its own Undo also takes the result back
        (its history belongs to the editor widget, so only then; the panel's Undo works always)."""
        module = getattr(slicer.modules, "segmenteditor", None) if segmentationNode is not None else None
        editor = getattr(module.widgetRepresentation().self(), "editor", None) if module else None
        edited = editor.segmentationNode() if editor is not None else None
        if edited is not None and edited.GetID() == segmentationNode.GetID():
            editor.saveStateForUndo()

    # --- results ---------------------------------------------------------------------------------

    def outputSegmentation(self):
        return self.runs.output_node()

    def lowConfidenceSlices(self):
        return self.lowConfidence.refresh()

    def jumpToSlice(self, index) -> str:
        """Centre the slice views on slice ``index`` (along the run's slicing axis) of the query; "" when
        done, else why not (the listed result is gone: the caller empties its table)."""
        ras, message = self.lowConfidence.target(index)
        if ras is not None:
            r, a, s = ras
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return message
