"""SAM2FewShot: segment a volume in 3D Slicer from labelled examples with SAM2, without training.

The Widget is thin (widgets and wiring); the Logic runs jobs on a background worker process and
moves data between the scene and the engine (SAM2FewShotLib, which imports no Qt).
"""

import dataclasses
import logging
import os
import shutil
import time
import traceback
from typing import Optional

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SAM2FewShotLib.common.cache import CACHE_ENV, cache_dir
from SAM2FewShotLib.common.errors import InputError, SAM2FewShotError
from SAM2FewShotLib.methods.registry import METHODS, get_method
from SAM2FewShotLib.sam2 import registry, weights
from SAM2FewShotLib.slicer import install, panel, runs, scene_io
from SAM2FewShotLib.slicer.panel import PanelChoices

SETTINGS = "SAM2FewShot/"
TITLE = "SAM2FewShot"
POLL_MS = 100
# Parameter -> the widget that shows it (node references, combo-box data, spin-box values).
NODE_SELECTORS = {"QueryVolume": "queryVolumeSelector", "SupportVolume": "supportVolumeSelector",
                  "SupportSegmentation": "supportSegmentationSelector", "OutputSegmentation": "outputSegmentationSelector"}
COMBO_BOXES = {"Method": "methodComboBox", "Model": "modelComboBox", "Device": "deviceComboBox",
               "Scheme": "schemeComboBox", "Axis": "axisComboBox", "ExistingPolicy": "existingPolicyComboBox"}
SPIN_BOXES = {"Augmentations": "augmentationsSpinBox", "TopK": "topKSpinBox"}
# Other widgets whose changes go into the parameter node, with the signal that reports them.
PARAMETER_SIGNALS = (("normalizationComboBox", "editTextChanged(QString)"), ("sliceRangeCheckBox", "toggled(bool)"),
                     ("firstSliceSpinBox", "valueChanged(int)"), ("lastSliceSpinBox", "valueChanged(int)"),
                     ("supportSceneRadioButton", "toggled(bool)"), ("libraryPathLineEdit", "currentPathChanged(QString)"),
                     ("supportSegmentsListWidget", "itemChanged(QListWidgetItem*)"))
SCENE_SUPPORT_WIDGETS = ("supportSegmentationLabel", "supportSegmentationSelector", "supportSegmentsLabel",
                         "supportSegmentsListWidget")
LIBRARY_WIDGETS = ("libraryPathLabel", "libraryPathLineEdit", "libraryCasesLabel")
MATCHING_WIDGETS = ("augmentationsSpinBox", "schemeComboBox", "topKSpinBox")
MODEL_WIDGETS = ("modelComboBox", "deviceComboBox", "downloadModelButton", "importCheckpointButton")
INPUT_SECTIONS = ("queryCollapsibleButton", "supportCollapsibleButton", "methodCollapsibleButton")


class SAM2FewShot(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SAM2 Few-Shot"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SAM2FewShot contributors"]
        self.parent.helpText = """
Segments a volume from labelled examples with SAM2 (Segment Anything 2), without training:
<b>Propagate</b> masks drawn on a few slices through the volume, or let a labelled <b>support</b>
case guide SAM2 (matched support, registration). Runs in the background: Apply becomes Cancel, and
the scene changes only when a run succeeds, in one undoable step. Fix a few slices with the Segment
Editor, then <b>Refine from edited slices</b> re-propagates from them.
"""
        self.parent.acknowledgementText = """
Uses SAM 2 by Meta AI (Ravi et al., "SAM 2: Segment Anything in Images and Videos", 2024, Apache-2.0)
and optionally MedSAM2 (Bo Wang lab). The Slicer integration learned from the MONAIAuto3DSeg,
TotalSegmentator and nnInteractive extensions.
"""


class SAM2FewShotWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._observedSegmentation = None
        self._download = None
        self._libraryNote = (None, "")
        self._elapsedTimer = qt.QTimer()

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAM2FewShot.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAM2FewShotLogic()
        self.logic.progressCallback, self.logic.logCallback = self.onProgress, self.addLog
        self.logic.finishedCallback = self.onFinished
        self.fillChoices()
        signals = [(n, "currentNodeChanged(vtkMRMLNode*)") for n in NODE_SELECTORS.values()]
        signals += [(n, "currentIndexChanged(int)") for n in COMBO_BOXES.values()]
        signals += [(n, "valueChanged(int)") for n in SPIN_BOXES.values()] + list(PARAMETER_SIGNALS)
        for name, signal in signals:
            getattr(self.ui, name).connect(signal, self.updateParameterNodeFromGUI)
        self.ui.supportSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.observeSupportSegmentation)
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onCacheFolderChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refineButton.connect("clicked(bool)", lambda: self.guarded(self.startRun, True))
        self.ui.downloadModelButton.connect("clicked(bool)", lambda: self.guarded(self.startModelDownload, None))
        self.ui.importCheckpointButton.connect("clicked(bool)", self.onImportCheckpoint)
        self.ui.lowConfidenceTableWidget.connect("cellClicked(int,int)", self.onLowConfidenceClicked)
        self._elapsedTimer.setInterval(1000)
        self._elapsedTimer.connect("timeout()", self.updateElapsed)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def fillChoices(self):
        availability = panel.method_availability()
        for index, method in enumerate(METHODS.values()):
            self.ui.methodComboBox.addItem(method.label, method.key)
            self.ui.methodComboBox.setItemData(index, availability[method.key] or method.summary, qt.Qt.ToolTipRole)
            if availability[method.key]:  # shown, disabled, the tooltip says why
                self.ui.methodComboBox.model().item(index).setEnabled(False)
        for index, spec in enumerate(registry.REGISTRY.values()):
            self.ui.modelComboBox.addItem(spec.name, spec.name)
            self.ui.modelComboBox.setItemData(index, spec.description, qt.Qt.ToolTipRole)
        for combo, values in ((self.ui.deviceComboBox, panel.DEVICES), (self.ui.axisComboBox, panel.AXES),
                              (self.ui.schemeComboBox, panel.SCHEMES),
                              (self.ui.existingPolicyComboBox, panel.POLICIES)):
            for value in values:
                combo.addItem(value, value)
        self.ui.normalizationComboBox.addItems(list(panel.NORMALIZATIONS))
        self.ui.lowConfidenceTableWidget.setColumnCount(4)
        self.ui.lowConfidenceTableWidget.setHorizontalHeaderLabels(["Slice", "Segment", "Confidence", "Source"])
        self.ui.cacheFolderPathLineEdit.currentPath = self.logic.cacheFolder()

    def cleanup(self):
        self.removeObservers()
        self._elapsedTimer.stop()
        if self.logic:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node <-> widgets --------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("QueryVolume"):
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.SetNodeReferenceID("QueryVolume", volume.GetID())

    def setParameterNode(self, node):
        if node:
            self.logic.setDefaultParameters(node)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._parameterNode
            for reference, name in NODE_SELECTORS.items():
                getattr(self.ui, name).setCurrentNode(p.GetNodeReference(reference))
            for parameter, name in COMBO_BOXES.items():
                combo = getattr(self.ui, name)
                combo.currentIndex = max(0, combo.findData(p.GetParameter(parameter)))
            choices = self.logic.choices(p)
            self.ui.augmentationsSpinBox.value, self.ui.topKSpinBox.value = choices.augmentations, choices.top_k
            self.ui.normalizationComboBox.setCurrentText(choices.normalization)
            self.ui.sliceRangeCheckBox.checked = choices.slice_range is not None
            if choices.slice_range:
                self.ui.firstSliceSpinBox.value, self.ui.lastSliceSpinBox.value = choices.slice_range
            library = p.GetParameter("SupportSource") == "library"
            self.ui.supportLibraryRadioButton.checked, self.ui.supportSceneRadioButton.checked = library, not library
            self.ui.libraryPathLineEdit.currentPath = p.GetParameter("LibraryFolder")
            self.updateSegmentList()
        finally:
            self._updatingGUI = False
        self.updateWidgetStates()

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updatingGUI:
            return
        p = self._parameterNode
        wasModifying = p.StartModify()
        for reference, name in NODE_SELECTORS.items():
            p.SetNodeReferenceID(reference, getattr(self.ui, name).currentNodeID)
        for parameter, name in COMBO_BOXES.items():
            p.SetParameter(parameter, getattr(self.ui, name).currentData or "")
        for parameter, name in SPIN_BOXES.items():
            p.SetParameter(parameter, str(getattr(self.ui, name).value))
        p.SetParameter("Normalization", self.ui.normalizationComboBox.currentText.strip())
        first, last = self.ui.firstSliceSpinBox.value, self.ui.lastSliceSpinBox.value
        p.SetParameter("SliceRange", f"{first},{last}" if self.ui.sliceRangeCheckBox.checked else "")
        p.SetParameter("SupportSource", "library" if self.ui.supportLibraryRadioButton.checked else "scene")
        p.SetParameter("LibraryFolder", self.ui.libraryPathLineEdit.currentPath)
        if self.ui.supportSegmentsListWidget.count:  # unchecked ones: new segments come checked
            p.SetParameter("ExcludedSegments", ",".join(self.segmentIds(checked=False)))
        p.EndModify(wasModifying)

    def observeSupportSegmentation(self, node):
        """Keep the segment checklist in step with segments added, removed or renamed."""
        for event in (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                      slicer.vtkSegmentation.SegmentModified):
            if self._observedSegmentation is not None:
                self.removeObserver(self._observedSegmentation, event, self.onSegmentsChanged)
            if node is not None:
                self.addObserver(node, event, self.onSegmentsChanged)
        self._observedSegmentation = node
        self.updateSegmentList()

    def onSegmentsChanged(self, caller=None, event=None):
        self.updateSegmentList()

    def updateSegmentList(self):
        widget = self.ui.supportSegmentsListWidget
        wasBlocked = widget.blockSignals(True)
        widget.clear()
        excluded = self._parameterNode.GetParameter("ExcludedSegments").split(",") if self._parameterNode else []
        for segmentId, name, color in scene_io.segment_entries(self.ui.supportSegmentationSelector.currentNode()):
            item = qt.QListWidgetItem(name)
            item.setData(qt.Qt.UserRole, segmentId)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked if segmentId in excluded else qt.Qt.Checked)
            swatch = qt.QPixmap(12, 12)
            swatch.fill(qt.QColor.fromRgbF(*color))
            item.setIcon(qt.QIcon(swatch))
            widget.addItem(item)
        widget.blockSignals(wasBlocked)

    def segmentIds(self, checked=True):
        widget = self.ui.supportSegmentsListWidget
        state = qt.Qt.Checked if checked else qt.Qt.Unchecked
        return [widget.item(i).data(qt.Qt.UserRole) for i in range(widget.count) if widget.item(i).checkState() == state]

    def setWidgets(self, names, **properties):
        for name in names:
            for key, value in properties.items():
                setattr(getattr(self.ui, name), key, value)

    def updateWidgetStates(self):
        if self._parameterNode is None:
            return
        choices = self.logic.choices(self._parameterNode)
        method, running = get_method(choices.method), self.logic.isRunning
        library = self.ui.supportLibraryRadioButton.checked and method.uses_support_volume
        self.ui.supportLibraryRadioButton.enabled = method.uses_support_volume
        self.setWidgets(("supportVolumeLabel", "supportVolumeSelector"), visible=method.uses_support_volume and not library)
        self.setWidgets(SCENE_SUPPORT_WIDGETS, visible=not library)
        self.setWidgets(LIBRARY_WIDGETS, visible=library)
        folder = self.ui.libraryPathLineEdit.currentPath
        if library and self._libraryNote[0] != folder:  # a folder is scanned once, not on every change
            self._libraryNote = (folder, self.logic.describeLibrary(folder))
            self.ui.libraryCasesLabel.text = self._libraryNote[1]
        self.ui.methodDescriptionLabel.text = method.summary
        self.setWidgets(MATCHING_WIDGETS, enabled=method.key == "matched-support")
        self.setWidgets(MODEL_WIDGETS, enabled=method.needs_model and not running)
        self.ui.modelStatusLabel.text = self.logic.modelStatus(choices.model) if method.needs_model else "No model needed."
        self.setWidgets(("firstSliceSpinBox", "lastSliceSpinBox"), enabled=self.ui.sliceRangeCheckBox.checked)
        self.setWidgets(INPUT_SECTIONS, enabled=not running)
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.toolTip = "Stop the run; the scene stays as it was." if running else "Segment in the background."
        self.ui.applyButton.enabled = running or self._parameterNode.GetNodeReference("QueryVolume") is not None
        self.ui.refineButton.enabled = not running and self.logic.canRefine()

    # --- actions -----------------------------------------------------------------------------------

    def guarded(self, action, *args):
        """Run an action; a failure is one message (no traceback for errors the user can act on)."""
        try:
            return action(*args)
        except SAM2FewShotError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=TITLE)
        except Exception as exc:  # noqa: BLE001 - one clear message, the details in the log
            logging.error(traceback.format_exc())
            slicer.util.errorDisplay(f"SAM2FewShot failed: {exc}", windowTitle=TITLE, detailedText=traceback.format_exc())
        return None

    def onApplyButton(self):
        if self.logic.isRunning:
            self.logic.cancel()
        else:
            self.guarded(self.startRun, False)

    def startRun(self, refine):
        p = self._parameterNode
        choices = self.logic.choices(p)
        if refine:  # a refine run propagates, whatever the panel's method
            choices = dataclasses.replace(choices, method="propagate")
        if not self.ensureReady(choices, lambda: self.startRun(refine)):
            return
        self.addLog(f"--- {'refine' if refine else choices.method} ---")
        if refine:
            self.logic.startRefine(choices)
        else:
            library = p.GetParameter("LibraryFolder") if p.GetParameter("SupportSource") == "library" else None
            self.logic.startRun(choices, p.GetNodeReference("QueryVolume"), p.GetNodeReference("SupportSegmentation"),
                                self.segmentIds(), p.GetNodeReference("SupportVolume"), library,
                                p.GetNodeReference("OutputSegmentation"), p.GetParameter("ExistingPolicy") or "keep")
        self.logic.saveSettings(p)
        self.ui.progressBar.value = 0
        self._elapsedTimer.start()
        self.updateWidgetStates()

    def ensureReady(self, choices, then):
        """Packages, weights and GPU memory, asking first; False stops (a download resumes with ``then``)."""
        method = get_method(choices.method)
        confirm = lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=f"{TITLE} setup")  # noqa: E731
        if not self.logic.ensureDependencies(method.needs_model, confirm):
            return False
        if not method.needs_model:
            return True
        if not self.logic.isModelCached(choices.model):
            if confirm(f"The weights of {choices.model} are not on this computer yet. Download them from Hugging Face "
                       f"into {self.logic.cacheFolder()}?\n\nOffline sites: use Import checkpoint file."):
                self.startModelDownload(then)
            return False
        advice = self.logic.gpuAdvice(choices.model, choices.device)
        return advice is None or slicer.util.confirmYesNoDisplay(f"{advice}\n\nRun anyway?", windowTitle=TITLE)

    def startModelDownload(self, then):
        """The weights in a background thread, with a progress dialog polled by a timer (cancellable)."""
        name = self.ui.modelComboBox.currentData
        dialog = qt.QProgressDialog(f"Downloading {name} weights...", "Cancel", 0, 100, slicer.util.mainWindow())
        dialog.setWindowModality(qt.Qt.WindowModal)
        dialog.minimumDuration = 0
        download, timer = install.BackgroundDownload(name), qt.QTimer()

        def poll():
            if dialog.wasCanceled:
                download.cancel()
            dialog.setValue(int(100 * download.fraction))
            dialog.setLabelText(panel.progress_text("download", download.done, download.total))
            if download.finished:
                timer.stop()
                dialog.close()
                self._download = None
                self.updateWidgetStates()
                if download.error is not None:
                    slicer.util.errorDisplay(str(download.error), windowTitle=f"{TITLE} download")
                elif then is not None:
                    self.guarded(then)

        timer.connect("timeout()", poll)
        timer.start(200)
        self._download = (dialog, timer, download)  # kept alive until it finishes

    def onImportCheckpoint(self):
        name = self.ui.modelComboBox.currentData
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), f"Import a checkpoint file as {name}", "",
                                              "PyTorch checkpoints (*.pt *.pth);;All files (*)")
        if path:
            with slicer.util.WaitCursor():
                target = self.guarded(self.logic.importCheckpoint, name, path)
            if target:
                self.addLog(f"Imported {path} as {name} ({target})")
            self.updateWidgetStates()

    def onCacheFolderChanged(self, path):
        self.logic.setCacheFolder(path)
        self.updateWidgetStates()

    # --- run feedback --------------------------------------------------------------------------------

    def onProgress(self, stage, done, total):
        self.ui.progressBar.value = panel.progress_percent(done, total)
        self.ui.statusLabel.text = panel.progress_text(stage, done, total)

    def addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def updateElapsed(self):
        self.ui.elapsedLabel.text = panel.format_elapsed(self.logic.elapsed())

    def onFinished(self, success, message):
        self._elapsedTimer.stop()
        self.ui.statusLabel.text = message
        self.ui.progressBar.value = 100 if success else 0
        self.addLog(message)
        if success:
            self.fillLowConfidenceTable()
            if self._parameterNode is not None:
                self._parameterNode.SetNodeReferenceID("OutputSegmentation", self.logic.outputSegmentation().GetID())
        elif not self.logic.cancelled:
            slicer.util.errorDisplay(message, windowTitle=TITLE)
        self.updateWidgetStates()

    def fillLowConfidenceTable(self):
        table = self.ui.lowConfidenceTableWidget
        table.setSortingEnabled(False)
        flags = self.logic.lowConfidenceSlices()
        table.setRowCount(len(flags))
        for row, flag in enumerate(flags):
            for column, value in enumerate((flag.slice, flag.segment, round(flag.confidence, 2), flag.source)):
                item = qt.QTableWidgetItem()
                item.setData(qt.Qt.DisplayRole, value)
                item.setData(qt.Qt.UserRole, flag.slice)
                table.setItem(row, column, item)
        table.setSortingEnabled(True)
        table.resizeColumnsToContents()

    def onLowConfidenceClicked(self, row, column):
        item = self.ui.lowConfidenceTableWidget.item(row, 0)
        if item is not None:
            self.logic.jumpToSlice(int(item.data(qt.Qt.UserRole)))


class SAM2FewShotLogic(ScriptedLoadableModuleLogic):
    """Settings, first-use setup, and runs on the background worker (runs.RunController)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.progressCallback = lambda stage, done, total: None
        self.logCallback = logging.info
        self.finishedCallback = lambda success, message: None
        self.runs = runs.RunController(
            slicer.mrmlScene, self._workerClient, lambda *a: self.progressCallback(*a), lambda t: self.logCallback(t),
            self._onFinished, self._saveEditorUndoState)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.poll)
        os.environ.setdefault(CACHE_ENV, self.cacheFolder())

    # --- parameters and settings ---------------------------------------------------------------

    def setDefaultParameters(self, parameterNode):
        """Unset parameters get the last choices (QSettings), else the built-in defaults."""
        settings = qt.QSettings()
        for name, default in panel.PARAMETER_DEFAULTS.items():
            if not parameterNode.GetParameter(name):
                remembered = settings.value(SETTINGS + name) if name in panel.REMEMBERED else None
                parameterNode.SetParameter(name, str(remembered or default))

    def choices(self, parameterNode) -> PanelChoices:
        names = list(panel.PARAMETER_DEFAULTS)
        return panel.choices_from_parameters({n: parameterNode.GetParameter(n) for n in names})

    def saveSettings(self, parameterNode):
        settings = qt.QSettings()
        for name in panel.REMEMBERED:
            settings.setValue(SETTINGS + name, parameterNode.GetParameter(name))

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

    # --- first use: packages, weights, GPU memory ----------------------------------------------

    def ensureDependencies(self, needsModel, confirm) -> bool:
        """Install missing packages once ``confirm(question)`` agrees; False when the user declines."""
        return install.ensure_installed(needsModel, confirm, slicer.util.pip_install, self.installTorch,
                                             self.logCallback)

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

    def gpuAdvice(self, model, device) -> Optional[str]:
        return install.gpu_advice_for(model, device)

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

    def startRun(self, choices, queryNode, supportSegmentationNode=None, segmentIds=None, supportVolumeNode=None,
                 libraryFolder=None, outputSegmentationNode=None, existing="keep") -> str:
        """Read the inputs from the scene and submit the job; the scene is not touched until it succeeds."""
        jobId = self.runs.start_run(choices, queryNode, supportSegmentationNode, segmentIds, supportVolumeNode,
                                    libraryFolder, outputSegmentationNode, existing)
        self._timer.start()
        return jobId

    def canRefine(self) -> bool:
        return self.runs.can_refine()

    def startRefine(self, choices) -> str:
        """Propagate from the slices edited since the last result; those segments are then replaced."""
        jobId = self.runs.start_refine(choices)
        self._timer.start()
        return jobId

    def poll(self):
        """Timer slot: the worker's events, without ever blocking."""
        if not self.runs.poll():
            self._timer.stop()

    def cancel(self):
        """Kill the worker's process tree; nothing of the run reaches the scene."""
        self._timer.stop()
        self.runs.cancel()

    def shutdown(self):
        self._timer.stop()
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
        return WorkerClient(python=python, pythonpath=[os.path.dirname(__file__)], env=environment)

    @staticmethod
    def _saveEditorUndoState(segmentationNode):
        """When the Segment Editor edits this segmentation, its Undo takes the whole insertion back."""
        module = getattr(slicer.modules, "segmenteditor", None) if segmentationNode is not None else None
        editor = getattr(module.widgetRepresentation().self(), "editor", None) if module else None
        edited = editor.segmentationNode() if editor is not None else None
        if edited is not None and edited.GetID() == segmentationNode.GetID():
            editor.saveStateForUndo()

    # --- results ---------------------------------------------------------------------------------

    def outputSegmentation(self):
        return self.runs.output_node()

    def lowConfidenceSlices(self):
        return self.runs.low_confidence()

    def jumpToSlice(self, index):
        """Centre the slice views on slice ``index`` (along the run's slicing axis) of the query."""
        r, a, s = self.runs.slice_position(index)
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    def describeLibrary(self, folder) -> str:
        return panel.describe_library(folder)


class SAM2FewShotTest(ScriptedLoadableModuleTest):
    """Inside real Slicer: propagate on a synthetic volume with the real SAM2 architecture, random weights."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_propagate_random_weights()

    def test_propagate_random_weights(self):
        import numpy as np

        logic = SAM2FewShotLogic()
        if not logic.ensureDependencies(True, lambda question: False):
            self.skipTest("torch and sam2 are not installed in this Slicer (the module's first use installs them)")
        zz, yy, xx = np.mgrid[:24, :64, :64]
        sphere = (zz - 12) ** 2 + (yy - 32) ** 2 + (xx - 30) ** 2 < 81
        noise = np.random.default_rng(0).normal(0, 20, sphere.shape)
        volumeNode = slicer.util.addVolumeFromArray((sphere * 400.0 - 100 + noise).astype(np.int16), name="Synthetic")
        volumeNode.SetSpacing(0.8, 0.8, 2.5)
        prompts = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Prompts")
        prompts.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = prompts.GetSegmentation().AddEmptySegment("sphere", "Sphere", [0.9, 0.3, 0.2])
        mask = np.zeros(sphere.shape, dtype=np.uint8)
        mask[[9, 15]] = sphere[[9, 15]]
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, prompts, segmentId, volumeNode)

        finished = []
        logic.finishedCallback = lambda success, message: finished.append((success, message))
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        choices = PanelChoices(method="propagate", device="cpu", random_weights=True, image_size=256)
        with self.assertRaises(InputError):  # bad input: one clear error, nothing submitted
            logic.startRun(choices, volumeNode, None, None)
        logic.startRun(choices, volumeNode, prompts, [segmentId])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes, "the scene changed before the run succeeded")
        deadline = time.monotonic() + 600
        while not finished and time.monotonic() < deadline:
            slicer.app.processEvents()  # the test waits; the panel never does
            time.sleep(0.05)
        logic.shutdown()
        self.assertTrue(finished and finished[0][0], finished)
        output, ids = logic.outputSegmentation(), logic.lastResult.segment_ids
        self.assertEqual(output.GetSegmentation().GetSegment(ids[0]).GetName(), "Sphere")
        np.testing.assert_allclose(output.GetSegmentation().GetSegment(ids[0]).GetColor(), [0.9, 0.3, 0.2], atol=1e-3)
        result = slicer.util.arrayFromSegmentBinaryLabelmap(output, ids[0], volumeNode)
        for k in (9, 15):  # mask-prompted slices come back verbatim
            np.testing.assert_array_equal(result[k] > 0, sphere[k])
        self.assertEqual(len(logic.lastResult.report["slices"]), 24)
        self.delayDisplay("SAM2FewShot self-test passed")
