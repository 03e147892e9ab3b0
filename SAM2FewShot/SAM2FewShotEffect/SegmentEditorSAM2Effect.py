"""The SAM2 Segment Editor effect: click on a slice, see SAM2's mask, Propagate through the volume.

The Qt side only: mouse and keys in the slice views, the prompts drawn in the views, the options frame.
Everything else is SAM2FewShotLib.slicer.click_session.ClickSession (no Qt, tested headless), kept on the
SAM2 Few-Shot module's Logic so that one worker and one model serve the panel and the effect.

Built like Slicer 5.10's own scripted effects (Modules/Loadable/Segmentations/EditorEffects/Python/
SegmentEditorEffects/): clone() as SegmentEditorLevelTracingEffect's, a 2D actor per slice view added with
scriptedEffect.addActor2D and removed on deactivate (LevelTracing's pipelines), processInteractionEvents
returning True for the events it handles, scriptedEffect.saveStateForUndo() before every change. Not on
AbstractScriptedSegmentEditorAutoCompleteEffect: that base works on the whole segmentation (perSegment
False) through a preview and Apply, and this effect writes SAM2's answer into the selected segment at
once, undoable, as Paint or Level tracing do. Loaded by setPythonSource (the parent folder is the module
name, the file name the class): absolute imports only.
"""

import logging
import os

import numpy as np
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from SAM2FewShotLib.common.errors import SAM2FewShotError
from SAM2FewShotLib.slicer.click_session import RELEASE_AFTER_S, ClickSession
from SAM2FewShotLib.slicer.mrml_volume import matrix_to_numpy

EFFECT_NAME = "SAM2"  # not translated: modules find effects by name
POLL_MS = 100
MARKS_DELAY_MS = 150  # after the segmentation's last change event (an undo sends several)
DRAG_PIXELS = 5  # a press and release further apart than this is a box
MARK_PIXELS = 5
COLORS = {"include": (70, 220, 70), "exclude": (240, 60, 60), "box": (250, 210, 50), "drag": (240, 240, 240)}
_USED = {}  # "logic": the module Logic whose ClickSession the effect uses
ICON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "Icons",
                    "SegmentEditorSAM2Effect.png")  # a slice, a segment, an include point, the pointer
HELP = """<html>Segment the selected segment with SAM2 (Segment Anything 2), slice by slice, then through the
volume. Click on a slice view: SAM2's mask of the segment on that slice appears, and each further click
refines it. <b>Propagate</b> fills the volume both ways from every slice you prompted (clicked or boxed,
or drawn and corrected with other effects since the last propagation), for every segment you prompted,
and writes into those segments; slices it filled are not prompts for the next Propagate.
<p><ul style="margin: 0">
<li><b>Left click:</b> include point.
<li><b>Shift + left click</b> or <b>right click:</b> exclude point.
<li><b>Left drag:</b> box (the slice starts afresh from it).
<li><b>P:</b> Propagate. <b>C:</b> Clear prompts (the segments keep their voxels).
<li><b>Ctrl+Z</b> (or Z): undo, <b>Ctrl+Y</b> (or Y): redo: the Segment Editor's own, for every change. A click
taken back is forgotten; on a slice corrected with another effect, the next click refines the correction.
</ul><p>Keys act while the mouse is over a slice view. Prompts are on the slices of the view first clicked
in (axial, coronal or sagittal, as the volume lies); an oblique view, or another orientation while
prompts exist, is refused (Clear prompts to change). Uses the model chosen in the SAM2 Few-Shot module;
its first use there installs the packages and downloads the weights.</html>"""


class SegmentEditorSAM2Effect(AbstractScriptedSegmentEditorEffect):
    """Clicks and boxes on slice views to SAM2's live session; Propagate; the prompts drawn in the views."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = EFFECT_NAME
        scriptedEffect.title = "SAM2"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.pipelines = {}  # slice widget -> PromptPipeline
        self.drag = None  # (slice widget, start xy, exclude, button) while a button is down
        self.packagesReady = False
        self.shownMessage = None
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MS)
        self.pollTimer.connect("timeout()", self.poll)
        self.releaseTimer = qt.QTimer()  # leaving the effect keeps the session warm this long
        self.releaseTimer.setSingleShot(True)
        self.releaseTimer.setInterval(int(RELEASE_AFTER_S * 1000))
        self.releaseTimer.connect("timeout()", self.release)
        self.marksTimer = qt.QTimer()  # the points shown follow the segment (Ctrl+Z), once its events settle
        self.marksTimer.setSingleShot(True)
        self.marksTimer.setInterval(MARKS_DELAY_MS)
        self.marksTimer.connect("timeout()", self.refreshMarks)
        self.observedSegmentation, self.segmentationObservations = None, []

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        return qt.QIcon(ICON) if os.path.exists(ICON) else qt.QIcon()

    def helpText(self):
        return HELP

    def cleanup(self):
        self.observeSegmentation(False)
        for timer, slot in ((self.pollTimer, self.poll), (self.releaseTimer, self.release),
                            (self.marksTimer, self.refreshMarks)):
            timer.stop()
            timer.disconnect("timeout()", slot)

    def setupOptionsFrame(self):
        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.objectName = self.__class__.__name__ + "Propagate"
        self.propagateButton.setToolTip("Fill the volume both ways from every prompted slice, for every prompted "
                                        "segment (P)")
        self.clearButton = qt.QPushButton("Clear prompts")
        self.clearButton.objectName = self.__class__.__name__ + "Clear"
        self.clearButton.setToolTip("Forget every click and drawn slice of this session; the segments keep their "
                                    "voxels (C)")
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.propagateButton)
        buttons.addWidget(self.clearButton)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.statusLabel = qt.QLabel("Click on a slice view: left to include, Shift+left or right to exclude, "
                                     "drag for a box.")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.propagateButton.connect("clicked()", self.propagate)
        self.clearButton.connect("clicked()", self.clearPrompts)

    def setMRMLDefaults(self):
        pass

    def updateGUIFromMRML(self):
        if self.scriptedEffect.active():  # the segmentation chosen in the editor may have changed
            self.observeSegmentation(True)

    def updateMRMLFromGUI(self):
        pass

    def activate(self):
        self.releaseTimer.stop()
        layout = slicer.app.layoutManager()
        for name in layout.sliceViewNames() if layout else []:
            self.pipelineFor(layout.sliceWidget(name))
        self.refreshMarks()
        self.observeSegmentation(True)
        if self.session(create=False) is not None:
            self.pollTimer.start()

    def deactivate(self):
        self.observeSegmentation(False)
        self.marksTimer.stop()
        for sliceWidget, pipeline in self.pipelines.items():
            self.scriptedEffect.removeActor2D(sliceWidget, pipeline.actor)
        self.pipelines, self.drag = {}, None
        if self.session(create=False) is not None:
            self.releaseTimer.start()  # answers still arrive (the poll timer runs until none is on its way)

    def layoutChanged(self):
        if self.scriptedEffect.active():
            self.deactivate()
            self.activate()

    def sourceVolumeNodeChanged(self):
        session = self.session(create=False)
        parameters = self.scriptedEffect.parameterSetNode()
        source = parameters.GetSourceVolumeNode() if parameters else None
        if session is not None and session.volume is not None and session.volume.node is not source:
            session.close("the source volume changed")

    # --- the controller ----------------------------------------------------------------------------

    @staticmethod
    def moduleLogic():
        """The SAM2 Few-Shot module's Logic (its panel is set up if it never was); None when it cannot run."""
        module = getattr(slicer.modules, "sam2fewshot", None)
        return getattr(module.widgetRepresentation().self(), "logic", None) if module else None

    def session(self, create=True):
        """The one ClickSession, on the module's Logic beside its RunController (one worker for both)."""
        logic = self.moduleLogic() if create else self._knownLogic()
        if logic is None:
            if create:
                raise SAM2FewShotError("the SAM2 Few-Shot module cannot run on this Slicer: its panel says why")
            return None
        _USED["logic"] = logic
        session = getattr(logic, "clickSession", None)
        if session is None and create:
            session = logic.clickSession = ClickSession(slicer.mrmlScene, logic.runs,
                                                        lambda: logic.choices(logic.getParameterNode()))
        if session is not None:
            session.before_change, session.on_message = self.beforeChange, logging.info
        return session

    @staticmethod
    def _knownLogic():
        """The Logic an effect already used, without setting up the module's panel for it."""
        return _USED.get("logic")

    def checkReady(self):
        """One sentence instead of a click when the packages or the weights are missing (the module asks
        before installing or downloading; the effect never does)."""
        logic = self.moduleLogic()
        if logic is None:
            raise SAM2FewShotError("the SAM2 Few-Shot module cannot run on this Slicer: its panel says why")
        if not self.packagesReady:
            from SAM2FewShotLib.slicer import install

            if install.plan_install(requirements=install.requirements_for(True)).needed or install.torch_problem(
                    install.torch_version()):
                raise SAM2FewShotError("SAM2 needs PyTorch and SAM2's packages: install them from the SAM2 Few-Shot "
                                       "module (its Apply asks before installing)")
            self.packagesReady = True
        choices = logic.choices(logic.getParameterNode())
        if not (choices.random_weights or choices.checkpoint or logic.isModelCached(choices.model)):
            raise SAM2FewShotError(f"the weights of {choices.model} are not downloaded yet: download them in the "
                                   "SAM2 Few-Shot module (Model, Download)")

    def beforeChange(self, segmentationNode):
        """The Segment Editor's undo state, before every change the session makes (Ctrl+Z takes it back)."""
        parameters = self.scriptedEffect.parameterSetNode()
        edited = parameters.GetSegmentationNode() if parameters else None
        if edited is not None and segmentationNode is not None and edited.GetID() == segmentationNode.GetID():
            self.scriptedEffect.saveStateForUndo()

    # --- the user's actions (public: the module's self-test calls them too) ----------------------------

    def clickAt(self, sliceWidget, ras, include=True):
        return self.act(lambda s, volume, seg, segment, view: s.click(volume, seg, segment, view, ras, include),
                        sliceWidget)

    def boxAt(self, sliceWidget, rasA, rasB):
        return self.act(lambda s, volume, seg, segment, view: s.box(volume, seg, segment, view, rasA, rasB),
                        sliceWidget)

    def propagate(self):
        return self.act(lambda s, *args: s.propagate())

    def clearPrompts(self):
        return self.act(lambda s, *args: s.clear(), ready=False)

    def act(self, action, sliceWidget=None, ready=True):
        """Run a ClickSession action; its refusal (one sentence) goes to the status line. True when done."""
        try:
            if ready:
                self.checkReady()
            session = self.session()
            parameters = self.scriptedEffect.parameterSetNode()
            view = None
            if sliceWidget is not None:
                view = matrix_to_numpy(self.scriptedEffect.viewNode(sliceWidget).GetSliceToRAS())
            action(session, parameters.GetSourceVolumeNode(), parameters.GetSegmentationNode(),
                   parameters.GetSelectedSegmentID(), view)
        except SAM2FewShotError as exc:
            self.showMessage(str(exc), error=True)
            return False
        self.showMessage(session.message)
        self.refreshMarks()
        self.pollTimer.start()
        return True

    def poll(self):
        """Timer slot: the worker's answers into the segments, the status line, the prompts in the views."""
        session = self.session(create=False)
        if session is None:
            self.pollTimer.stop()
            return
        try:
            busy = session.poll()
        except SAM2FewShotError as exc:
            busy = False
            self.showMessage(str(exc), error=True)
        if session.message != self.shownMessage:
            self.showMessage(session.message)
            self.refreshMarks()
        if not busy and not self.scriptedEffect.active():
            self.pollTimer.stop()

    def release(self):
        """The effect was left long ago: the worker frees the session (its features, its volume file)."""
        session = self.session(create=False)
        if session is not None and not self.scriptedEffect.active():
            session.close("unused for a while")

    def showMessage(self, message, error=False):
        self.shownMessage = message
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = f'<font color="red">{message}</font>' if error else message
        if error:
            logging.warning("SAM2 effect: %s", message)

    # --- mouse and keys -------------------------------------------------------------------------------

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        other = callerInteractor.GetControlKey() or callerInteractor.GetAltKey()
        if eventId == vtk.vtkCommand.KeyPressEvent:
            key = (callerInteractor.GetKeySym() or "").lower()
            if other or key not in ("p", "c"):
                return False
            self.propagate() if key == "p" else self.clearPrompts()
            return True
        xy = tuple(callerInteractor.GetEventPosition())
        shift = bool(callerInteractor.GetShiftKey())
        if eventId == vtk.vtkCommand.LeftButtonPressEvent and not other:
            self.drag = (viewWidget, xy, shift, "left")
            return True
        if eventId == vtk.vtkCommand.RightButtonPressEvent and not other:
            self.drag = (viewWidget, xy, True, "right")
            return True
        if self.drag is None or self.drag[0] != viewWidget:
            return False
        widget, start, exclude, button = self.drag
        moved = max(abs(xy[0] - start[0]), abs(xy[1] - start[1])) > DRAG_PIXELS
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            if button == "left":
                self.pipelineFor(viewWidget).drag = (start, xy) if moved else None
                self.refreshMarks()
            return True
        if eventId in (vtk.vtkCommand.LeftButtonReleaseEvent, vtk.vtkCommand.RightButtonReleaseEvent):
            self.drag = None
            self.pipelineFor(viewWidget).drag = None
            if moved and button == "left":
                self.boxAt(viewWidget, self.xyToRas(start, viewWidget), self.xyToRas(xy, viewWidget))
            elif not moved:
                self.clickAt(viewWidget, self.xyToRas(xy, viewWidget), include=not exclude)
            self.refreshMarks()
            return True
        return False

    def processViewNodeEvents(self, callerViewNode, eventId, viewWidget):
        if callerViewNode is not None and callerViewNode.IsA("vtkMRMLSliceNode") and viewWidget in self.pipelines:
            self.refreshMarks([viewWidget])

    # --- the prompts in the views --------------------------------------------------------------------

    def observeSegmentation(self, enabled):
        """Watch the edited segmentation while active, as Slicer's AutoComplete effect base does (SegmentModified,
        SourceRepresentationModified): a click taken back with Ctrl+Z, or drawn over, hides its points."""
        import vtkSegmentationCorePython as vtkSegmentationCore

        parameters = self.scriptedEffect.parameterSetNode()
        node = parameters.GetSegmentationNode() if enabled and parameters is not None else None
        segmentation = node.GetSegmentation() if node is not None else None
        if segmentation is self.observedSegmentation:
            return
        for tag in self.segmentationObservations:
            self.observedSegmentation.RemoveObserver(tag)
        self.observedSegmentation, self.segmentationObservations = segmentation, []
        if segmentation is not None:
            for event in (vtkSegmentationCore.vtkSegmentation.SegmentModified,
                          vtkSegmentationCore.vtkSegmentation.SourceRepresentationModified):
                self.segmentationObservations.append(
                    segmentation.AddObserver(event, lambda caller, eventId: self.marksTimer.start()))

    def pipelineFor(self, sliceWidget):
        if sliceWidget not in self.pipelines:
            pipeline = PromptPipeline()
            self.scriptedEffect.addActor2D(sliceWidget, pipeline.actor)
            self.pipelines[sliceWidget] = pipeline
        return self.pipelines[sliceWidget]

    def refreshMarks(self, widgets=None):
        """Each view shows the selected segment's points and box on the slice it shows, and a box being dragged."""
        session = self.session(create=False)
        parameters = self.scriptedEffect.parameterSetNode()
        marks = []
        if session is not None and parameters is not None:
            marks = session.marks(parameters.GetSegmentationNode(), parameters.GetSelectedSegmentID())
        for sliceWidget in widgets or list(self.pipelines):
            pipeline = self.pipelines[sliceWidget]
            sliceToRas = matrix_to_numpy(self.scriptedEffect.viewNode(sliceWidget).GetSliceToRAS())
            half = 0.5 * self.scriptedEffect.sliceSpacing(sliceWidget)
            lines = []
            for mark in marks:
                if abs(float(sliceToRas[:3, 2] @ (np.asarray(mark.ras) - sliceToRas[:3, 3]))) > half:
                    continue
                a = self.rasToXy(mark.ras, sliceWidget)
                if mark.kind == "box":
                    lines += rectangle(a, self.rasToXy(mark.ras2, sliceWidget), COLORS["box"])
                else:
                    lines += [((a[0] - MARK_PIXELS, a[1]), (a[0] + MARK_PIXELS, a[1]), COLORS[mark.kind]),
                              ((a[0], a[1] - MARK_PIXELS), (a[0], a[1] + MARK_PIXELS), COLORS[mark.kind])]
            if pipeline.drag is not None:
                lines += rectangle(*pipeline.drag, COLORS["drag"])
            pipeline.show(lines)
            self.scriptedEffect.scheduleRender(sliceWidget)


def rectangle(a, b, color):
    corners = [(a[0], a[1]), (b[0], a[1]), (b[0], b[1]), (a[0], b[1])]
    return [(corners[n], corners[(n + 1) % 4], color) for n in range(4)]


class PromptPipeline:
    """Coloured lines in a slice view's XY (display) coordinates: one 2D actor per view, as Level tracing has."""

    def __init__(self):
        self.drag = None  # (start xy, current xy) of a box being dragged
        self.polyData = vtk.vtkPolyData()
        self.mapper = vtk.vtkPolyDataMapper2D()
        self.mapper.SetInputData(self.polyData)
        self.mapper.SetScalarModeToUseCellData()
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(self.mapper)
        self.actor.GetProperty().SetLineWidth(2)

    def show(self, lines):
        points, cells = vtk.vtkPoints(), vtk.vtkCellArray()
        colors = vtk.vtkUnsignedCharArray()
        colors.SetNumberOfComponents(3)
        for a, b, color in lines:
            line = vtk.vtkLine()
            line.GetPointIds().SetId(0, points.InsertNextPoint(a[0], a[1], 0.0))
            line.GetPointIds().SetId(1, points.InsertNextPoint(b[0], b[1], 0.0))
            cells.InsertNextCell(line)
            colors.InsertNextTuple3(*color)
        self.polyData.SetPoints(points)
        self.polyData.SetLines(cells)
        self.polyData.GetCellData().SetScalars(colors)
        self.polyData.Modified()
