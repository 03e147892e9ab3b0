"""SAM2FewShot: segment a volume in 3D Slicer from labelled examples with SAM2, without training.

The Widget is thin (widgets and wiring, the parameter node of Slicer's 5.10 template); the Logic
runs jobs on a background worker process and moves data between the scene and the engine
(SAM2FewShotLib, which imports no Qt). Needs 3D Slicer 5.10 or later (Python 3.12).
"""

import dataclasses
import logging
import sys
import traceback

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from SAM2FewShotLib.common.errors import SAM2FewShotError
from SAM2FewShotLib.methods.registry import METHODS, get_method
from SAM2FewShotLib.sam2 import models
from SAM2FewShotLib.slicer import install, panel, scene_io
from SAM2FewShotPanel.first_use import FirstUse
from SAM2FewShotPanel.logic import SAM2FewShotLogic, SAM2FewShotParameterNode  # noqa: F401 - Slicer finds them here
from SAM2FewShotPanel.review_section import ReviewSection
from SAM2FewShotPanel.selftest import SAM2FewShotTest  # noqa: F401 - the module's self-test, run by Slicer

TITLE = "SAM2FewShot"
SCENE_SUPPORT_WIDGETS = ("supportSegmentationLabel", "supportSegmentationSelector", "supportSegmentsLabel",
                         "supportSegmentsListWidget")
MARKUPS_WIDGETS = ("promptPointsLabel", "promptPointsSelector", "promptBoxesLabel", "promptBoxesCheckableSelector")
LIBRARY_WIDGETS = ("libraryPathLabel", "libraryPathLineEdit", "libraryCasesLabel")
MATCHING_WIDGETS = ("augmentationsSpinBox", "schemeComboBox", "topKSpinBox")
MODEL_WIDGETS = ("modelComboBox", "deviceComboBox", "precisionComboBox", "downloadModelButton",
                 "importCheckpointButton")
INPUT_SECTIONS = ("queryCollapsibleButton", "supportCollapsibleButton", "methodCollapsibleButton")
REVIEW_SECTION = "reviewCollapsibleButton"


def registerSegmentEditorEffect():
    """The Segment Editor's SAM2 effect (SAM2FewShotEffect/), registered once Slicer has started."""
    from SAM2FewShotEffect import registerEffect

    registerEffect()


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
results go into the query's own result segmentation, replacing only what earlier runs wrote there
(Undo takes a result back). Correct a few slices with the Segment Editor, then <b>Refine</b>.
<b>Prompt points</b> and <b>boxes</b> (Propagate, Markups): a selected point includes, an unselected one excludes;
a ROI is a box on the slice through its centre, and its segment stays within the slices the ROI spans (Refine
too, widened to slices you correct outside it). Each goes to
the segment its (or its list's) name names, or to the only checked segment. Needs 3D Slicer 5.10 or later.
"""
        self.parent.acknowledgementText = """
Uses SAM 2 by Meta AI (Ravi et al., "SAM 2: Segment Anything in Images and Videos", 2024, Apache-2.0)
and optionally MedSAM2 (Bo Wang lab). The Slicer integration learned from the MONAIAuto3DSeg,
TotalSegmentator and nnInteractive extensions.
"""
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)  # as extensions register effects


class SAM2FewShotWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedSegmentation = None
        self.firstUse = FirstUse(self)  # packages and weights, asked for on first use
        self._libraryScan = None
        self.reviewSection = None
        self._elapsedTimer, self._scanTimer = qt.QTimer(), qt.QTimer()

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAM2FewShot.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        problem = install.host_problem((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info[:2])
        if problem:  # said before anything is offered, let alone installed
            self.ui.hostProblemLabel.text, self.ui.hostProblemLabel.visible = problem, True
            self.setWidgets(INPUT_SECTIONS + ("runCollapsibleButton", "refineCollapsibleButton", REVIEW_SECTION),
                            enabled=False)
            return
        self.logic = SAM2FewShotLogic()
        self.logic.progressCallback, self.logic.logCallback = self.onProgress, self.addLog
        self.logic.finishedCallback = self.onFinished
        self.fillChoices()
        self.reviewSection = ReviewSection(self.ui, self.logic._workerClient,
                                           lambda: panel.model_options(self.logic.choices(self._parameterNode)))
        self.reviewSection.setup()
        self.ui.supportSceneRadioButton.connect("toggled(bool)", self.onSupportSourceChanged)
        self.ui.supportSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.observeSupportSegmentation)
        self.ui.supportSegmentsListWidget.connect("itemChanged(QListWidgetItem*)", self.onSegmentChecked)
        self.ui.promptBoxesCheckableSelector.connect("checkedNodesChanged()", self.onPromptBoxesChecked)
        # ctkPathLineEdit has no editingFinished; its inner line edit does (CTK's ctkPathLineEdit.h).
        self.pathEdit(self.ui.libraryPathLineEdit).connect("editingFinished()", self.onLibraryFolderEdited)
        self.ui.libraryPathLineEdit.connect("currentPathChanged(QString)", self.onLibraryPathBrowsed)
        self.pathEdit(self.ui.cacheFolderPathLineEdit).connect("editingFinished()", self.onCacheFolderEdited)
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onCacheFolderBrowsed)
        self.ui.normalizationComboBox.lineEdit().connect("editingFinished()", self.onNormalizationEdited)
        self.ui.normalizationComboBox.connect("activated(int)", self.onNormalizationEdited)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refineButton.connect("clicked(bool)", lambda: self.guarded(self.startRun, True))
        self.ui.undoButton.connect("clicked(bool)", lambda: self.guarded(self.undoLastResult))
        self.ui.downloadModelButton.connect("clicked(bool)", lambda: self.guarded(self.firstUse.startModelDownload))
        self.ui.importCheckpointButton.connect("clicked(bool)", self.firstUse.importCheckpoint)
        self.ui.loadExampleButton.connect("clicked(bool)", self.onLoadExampleData)
        self.ui.lowConfidenceTableWidget.connect("cellClicked(int,int)", self.onLowConfidenceClicked)
        self._elapsedTimer.setInterval(1000)
        self._elapsedTimer.connect("timeout()", self.updateElapsed)
        self._scanTimer.setInterval(200)
        self._scanTimer.connect("timeout()", self.showLibraryScan)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    @staticmethod
    def pathEdit(pathLineEdit):
        return pathLineEdit.findChild(qt.QLineEdit)

    def fillChoices(self):
        """What connectGui does not fill: normalisation presets, table headers, the cache folder."""
        self.ui.normalizationComboBox.addItems(list(panel.NORMALIZATIONS))
        self.ui.lowConfidenceTableWidget.setColumnCount(4)
        self.ui.lowConfidenceTableWidget.setHorizontalHeaderLabels(["Slice", "Segment", "Confidence", "Source"])
        self.ui.cacheFolderPathLineEdit.currentPath = self.logic.cacheFolder()

    def describeChoices(self):
        """After connectGui refilled the combo boxes: tooltips, and methods that cannot run disabled."""
        availability = panel.method_availability()
        for index, method in enumerate(METHODS.values()):
            self.ui.methodComboBox.setItemData(index, availability[method.key] or method.summary, qt.Qt.ToolTipRole)
            self.ui.methodComboBox.model().item(index).setEnabled(availability[method.key] is None)
        for index, spec in enumerate(models.REGISTRY.values()):
            self.ui.modelComboBox.setItemData(index, spec.description, qt.Qt.ToolTipRole)

    def cleanup(self):
        self.removeObservers()
        self._elapsedTimer.stop()
        self._scanTimer.stop()
        if self.reviewSection:
            self.reviewSection.cleanup()
        if self.logic:
            self.logic.shutdown()

    def onReload(self):
        """Developer Reload: the panel and engine packages are imported afresh too, not only this file."""
        from SAM2FewShotLib.slicer.module_reload import drop_modules

        logging.debug("Reloading SAM2FewShot with its packages: %s", ", ".join(drop_modules()))
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        if self.logic:
            self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateWidgetStates)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        if self.reviewSection:
            self.reviewSection.onSceneClose()
        if self.logic:
            self.logic.lowConfidence.reset()
            self.ui.lowConfidenceTableWidget.setRowCount(0)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node --------------------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.queryVolume:
            self._parameterNode.queryVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateWidgetStates)
        self._parameterNode = parameterNode
        if parameterNode:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.describeChoices()
            self.showUnboundParameters()
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateWidgetStates)
        self.updateWidgetStates()

    def showUnboundParameters(self):
        """The hand-set widgets from the parameter node, once (never while the user edits them)."""
        p = self._parameterNode
        self.ui.supportLibraryRadioButton.checked = p.supportFromLibrary
        self.ui.supportSceneRadioButton.checked = not p.supportFromLibrary
        self.ui.libraryPathLineEdit.currentPath = p.libraryFolder
        self.ui.normalizationComboBox.setCurrentText(p.normalization)
        self.observeSupportSegmentation(p.supportSegmentation)
        boxes, checked = self.ui.promptBoxesCheckableSelector, {n.GetID() for n in p.promptBoxes if n is not None}
        wasBlocked = boxes.blockSignals(True)
        for node in list(boxes.checkedNodes()) + list(boxes.uncheckedNodes()):
            boxes.setCheckState(node, qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked)
        boxes.blockSignals(wasBlocked)
        self.scanLibrary(p.libraryFolder)

    def onPromptBoxesChecked(self):
        if self._parameterNode:
            self._parameterNode.promptBoxes = list(self.ui.promptBoxesCheckableSelector.checkedNodes())

    def onSupportSourceChanged(self, sceneChecked):
        if self._parameterNode:
            self._parameterNode.supportFromLibrary = not sceneChecked

    def onNormalizationEdited(self, *args):
        if self._parameterNode:
            self._parameterNode.normalization = self.ui.normalizationComboBox.currentText.strip() or "auto"

    def onSegmentChecked(self, item=None):
        if self._parameterNode:
            self._parameterNode.excludedSegments = ",".join(self.segmentIds(checked=False))

    def onLibraryFolderEdited(self):
        folder = self.ui.libraryPathLineEdit.currentPath
        if self._parameterNode and folder != self._parameterNode.libraryFolder:
            self._parameterNode.libraryFolder = folder
            self.scanLibrary(folder)

    def onLibraryPathBrowsed(self, path):
        if not self.pathEdit(self.ui.libraryPathLineEdit).hasFocus():  # chosen with Browse, not typed
            self.onLibraryFolderEdited()

    def scanLibrary(self, folder):
        """Count the folder's labelled cases on a background thread; the note shows when ready. A folder
        scanned already is not walked again each time the module is entered."""
        if not folder:
            self._libraryScan = None
            self.ui.libraryCasesLabel.text = panel.describe_library("")
            return
        if self._libraryScan is not None and self._libraryScan.folder == folder:
            return
        self._libraryScan = panel.LibraryScan(folder)
        self.ui.libraryCasesLabel.text = "Looking for labelled cases..."
        self._scanTimer.start()

    def showLibraryScan(self):
        scan = self._libraryScan
        if scan is None or scan.done:
            self._scanTimer.stop()
        if scan is not None and scan.done:
            self.ui.libraryCasesLabel.text = scan.result

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
        excluded = self._parameterNode.excludedSegments.split(",") if self._parameterNode else []
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
        return [widget.item(i).data(qt.Qt.UserRole) for i in range(widget.count)
                if widget.item(i).checkState() == state]

    def setWidgets(self, names, **properties):
        for name in names:
            for key, value in properties.items():
                setattr(getattr(self.ui, name), key, value)

    def updateWidgetStates(self, caller=None, event=None):
        """Enabled, visible and label states only: values are the parameter node's (connectGui)."""
        if self._parameterNode is None or self.logic is None:
            return
        p, running, installing = self._parameterNode, self.logic.isRunning, install.is_installing()
        method = get_method(p.method.value)
        library = p.supportFromLibrary and method.uses_support_volume
        self.ui.supportLibraryRadioButton.enabled = method.uses_support_volume
        self.setWidgets(("supportVolumeLabel", "supportVolumeSelector"),
                        visible=method.uses_support_volume and not library)
        self.setWidgets(SCENE_SUPPORT_WIDGETS, visible=not library)
        self.setWidgets(LIBRARY_WIDGETS, visible=library)
        self.ui.supportSegmentationLabel.text = "Segmentation:" if method.uses_support_volume else "Prompt masks:"
        self.setWidgets(MARKUPS_WIDGETS, visible=not method.uses_support_volume)
        self.ui.methodDescriptionLabel.text = method.summary
        self.setWidgets(MATCHING_WIDGETS, enabled=method.key == "matched-support")
        self.setWidgets(MODEL_WIDGETS, enabled=method.needs_model and not running)
        self.ui.modelStatusLabel.text = self.logic.modelStatus(p.model) if method.needs_model else "No model needed."
        self.setWidgets(("firstSliceSpinBox", "lastSliceSpinBox"), enabled=p.useSliceRange)
        self.setWidgets(INPUT_SECTIONS, enabled=not running and not installing)
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.toolTip = ("Stop the run; the scene stays as it was." if running
                                       else "Segment in the background.")
        self.ui.applyButton.enabled = not installing and (running or p.queryVolume is not None)
        self.ui.refineButton.enabled = not running and not installing and self.logic.canRefine()
        self.ui.undoButton.enabled = not running and self.logic.canUndo()

    # --- actions -----------------------------------------------------------------------------------

    def guarded(self, action, *args):
        """Run an action; a failure is one message (no traceback for errors the user can act on)."""
        try:
            return action(*args)
        except SAM2FewShotError as exc:
            slicer.util.errorDisplay(panel.panel_message(str(exc)), windowTitle=TITLE)
        except Exception as exc:  # noqa: BLE001 - one clear message, the details in the log
            logging.error(traceback.format_exc())
            slicer.util.errorDisplay(f"SAM2FewShot failed: {exc}", windowTitle=TITLE,
                                     detailedText=traceback.format_exc())
        return None

    def onApplyButton(self):
        if self.logic.isRunning:
            self.logic.cancel()  # returns at once; onFinished says "Cancelled."
        else:
            self.guarded(self.startRun, False)

    def startRun(self, refine):
        p = self._parameterNode
        choices = self.logic.choices(p)
        if refine:  # a refine run propagates, whatever the panel's method
            choices = dataclasses.replace(choices, method="propagate")
            inputs = None
        else:  # the inputs are checked before anything is installed or downloaded
            library = p.libraryFolder if p.supportFromLibrary else None
            inputs = self.logic.checkRun(choices, p.queryVolume, p.supportSegmentation, self.segmentIds(),
                                         p.supportVolume, library, p.promptPoints, p.promptBoxes)
        if not self.firstUse.ensureReady(choices, lambda: self.startRun(refine)):
            return
        self.addLog(f"--- {'refine' if refine else choices.method} ---")
        self.logic.runs.show_3d = p.show3D
        if refine:
            self.logic.startRefine(choices)
        else:
            self.logic.startRun(choices, p.queryVolume, inputs=inputs, outputSegmentationNode=p.outputSegmentation)
        self.logic.saveSettings(p)
        self.ui.progressBar.value = 0
        self._elapsedTimer.start()
        self.updateWidgetStates()

    def onLoadExampleData(self):
        """The public MSD hippocampus pair (fetched once, by the worker) into the scene and the selectors."""
        dialog = qt.QProgressDialog("Loading the example data...", "Cancel", 0, 0, slicer.util.mainWindow())
        dialog.setWindowModality(qt.Qt.WindowModal)  # no run starts while the worker fetches
        dialog.minimumDuration = 0

        def finished(nodes, message):
            cancelled = dialog.wasCanceled
            dialog.close()
            self.addLog(message)
            if nodes:
                p = self._parameterNode
                p.queryVolume, p.supportVolume, p.supportSegmentation = nodes
                self.ui.supportSceneRadioButton.checked = True
                slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)
            elif not cancelled:
                slicer.util.errorDisplay(panel.panel_message(message), windowTitle=TITLE)

        if self.guarded(self.logic.loadExampleData, dialog, finished) is None:
            dialog.close()

    def onCacheFolderEdited(self):
        self.logic.setCacheFolder(self.ui.cacheFolderPathLineEdit.currentPath)
        self.updateWidgetStates()

    def onCacheFolderBrowsed(self, path):
        if not self.pathEdit(self.ui.cacheFolderPathLineEdit).hasFocus():  # chosen with Browse, not typed
            self.onCacheFolderEdited()

    def undoLastResult(self):
        self.addLog(self.logic.undo())
        self.fillLowConfidenceTable()
        self.updateWidgetStates()

    # --- run feedback --------------------------------------------------------------------------------

    def onProgress(self, stage, done, total):
        self.ui.progressBar.value = panel.progress_percent(done, total)
        self.ui.statusLabel.text = panel.progress_text(stage, done, total, self.logic.estimate)

    def addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def updateElapsed(self):
        self.ui.elapsedLabel.text = panel.format_elapsed(self.logic.elapsed())

    def onFinished(self, success, message):
        self._elapsedTimer.stop()
        self.ui.statusLabel.text = message
        self.ui.progressBar.value = 100 if success else 0
        self.addLog(message)
        self.fillLowConfidenceTable()
        if not success and not self.logic.cancelled:
            slicer.util.errorDisplay(panel.panel_message(message), windowTitle=TITLE)
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
        message = self.logic.jumpToSlice(int(item.data(qt.Qt.UserRole))) if item is not None else ""
        if message:
            self.ui.statusLabel.text = message
            self.fillLowConfidenceTable()
