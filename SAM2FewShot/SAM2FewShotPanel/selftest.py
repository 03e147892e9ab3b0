"""The module's self-test, run by Slicer's extension build (slicer_add_python_unittest) and by anyone
with Slicer (Reload and Test): it drives the panel itself, as a user clicks.

A synthetic scene (a query, a shifted support with a two-segment segmentation): Registration
(no torch needed) through Apply, Apply again (replaces its own segments only), Undo, the scene
closed during a run: on a fresh Slicer with nothing installed (registration needs only what Slicer
ships). Then, when PyTorch and SAM2's packages are installed (never installed or downloaded here),
Propagate and Refine with the random-weight SAM2 architecture, every remembered setting put back after.
Then the review of a small cohort (a registration batch): open its folder, select a case, next flagged
slice, correct it and Accept corrected.
"""

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from SAM2FewShotLib.slicer import install, panel
from SAM2FewShotPanel.logic import REMEMBERED, SETTINGS, MethodChoice

TIMEOUT_S = 900
# The Extensions Index shows the screenshots EXTENSION_SCREENSHOTURLS names (top-level CMakeLists.txt): run the
# self-test with this variable set to the checkout's Screenshots folder and commit what it writes there
# (README, Publishing). Unset, nothing is captured.
SCREENSHOTS_ENV = "SAM2FEWSHOT_SCREENSHOTS"
SCREENSHOT_FILE = "SAM2FewShot-1.png"  # the panel and the views after a registration Apply


def _show_result(volume, segmentation):
    """Frame the result as a user sees it: conventional layout, the query fitted in the slice views, the
    segments as surfaces in 3D, so the catalog's picture shows what the module does, not an empty view."""
    slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    slicer.util.setSliceViewerLayers(background=volume, fit=True)
    segmentation.CreateClosedSurfaceRepresentation()
    slicer.app.layoutManager().threeDWidget(0).threeDView().resetFocalPoint()


def save_screenshot(volume, segmentation, name=SCREENSHOT_FILE):
    """Write the main window (panel and views) to $SAM2FEWSHOT_SCREENSHOTS/name when that is set.

    ctkWidgetsUtils.grabWidget, as Slicer's DICOM scene export does: QWidget.grab alone does not paint the
    OpenGL views (CTK pastes them in); the views are rendered first, as ScreenCapture's captureImageFromView does."""
    folder = os.environ.get(SCREENSHOTS_ENV)
    if not folder:
        return None
    import ctk

    _show_result(volume, segmentation)
    slicer.util.forceRenderAllViews()
    slicer.app.processEvents()
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if not ctk.ctkWidgetsUtils.grabWidget(slicer.util.mainWindow()).save(str(path)):
        raise AssertionError(f"could not write the screenshot {path}")
    return path


def _sphere_volume(name, centre, spacing=(1.0, 1.0, 2.0), shape=(24, 48, 48)):
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    left = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < 36
    right = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2] - 16) ** 2 < 25
    noise = np.random.default_rng(len(name)).normal(0, 15, shape)
    node = slicer.util.addVolumeFromArray((left * 300.0 + right * 500.0 - 100 + noise).astype(np.int16), name=name)
    node.SetSpacing(*spacing)
    return node, left, right


def _segmentation(name, volume, masks):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for (label, color), mask in zip((("Left", (0.9, 0.3, 0.2)), ("Right", (0.2, 0.6, 0.9))), masks, strict=True):
        segment_id = node.GetSegmentation().AddEmptySegment(label, label, color)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, volume)
    return node


class SAM2FewShotTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panel_click_path()
        self.setUp()
        self.test_review_walk()
        self.setUp()
        self.test_effect_click_path()

    def click_and_wait(self, widget, button, messages):
        """Click, then wait for *this* run's end: its own finished message, not the one before (a click that
        failed to start a run, or started a download instead, is a failure here, not a pass)."""
        before = len(messages)
        button.click()
        deadline = time.monotonic() + TIMEOUT_S
        while (widget.logic.isRunning or len(messages) == before) and time.monotonic() < deadline:
            slicer.app.processEvents()  # the test waits; the panel never does
            time.sleep(0.05)
        self.assertFalse(widget.logic.isRunning, "the run did not end in time")
        self.assertEqual(len(messages), before + 1, "the click started no run (see the log)")
        self.assertTrue(messages[-1][0], messages[-1])
        return messages[-1][1]

    def test_panel_click_path(self):
        slicer.util.selectModule("SAM2FewShot")
        widget = slicer.modules.sam2fewshot.widgetRepresentation().self()
        # Registration needs only what Slicer ships (issue 25): nothing to install, so nothing may be asked.
        self.assertTrue(widget.logic.ensureDependencies(False, lambda question: self.fail(f"asked: {question}")))
        query, _, _ = _sphere_volume("Query", (12, 24, 16))
        support, left, right = _sphere_volume("Support", (12, 22, 14))
        labels = _segmentation("Support labels", support, (left, right))
        messages = []
        self.addCleanup(setattr, widget.logic, "finishedCallback", widget.logic.finishedCallback)  # the panel's own
        widget.logic.finishedCallback = lambda success, message: (messages.append((success, message)),
                                                                  widget.onFinished(success, message))
        p = widget._parameterNode
        p.queryVolume, p.supportVolume, p.supportSegmentation = query, support, labels
        p.method = MethodChoice.registration

        self.click_and_wait(widget, widget.ui.applyButton, messages)  # Apply: registration, no model
        output = widget.logic.outputSegmentation()
        names = sorted(output.GetSegmentation().GetNthSegment(n).GetName() for n in range(2))
        self.assertEqual(names, ["Left", "Right"])
        self.assertIn("added Left, Right", messages[-1][1])
        save_screenshot(query, output)  # only with $SAM2FEWSHOT_SCREENSHOTS set
        nodes = slicer.mrmlScene.GetNumberOfNodes()

        message = self.click_and_wait(widget, widget.ui.applyButton, messages)  # Apply again: replaced, none added
        self.assertIn("replaced Left, Right", message)
        self.assertIs(widget.logic.outputSegmentation(), output)
        self.assertEqual((slicer.mrmlScene.GetNumberOfNodes(), output.GetSegmentation().GetNumberOfSegments()),
                         (nodes, 2))
        widget.ui.undoButton.click()  # the panel's Undo, the Segment Editor not open
        self.assertEqual(output.GetSegmentation().GetNumberOfSegments(), 2)

        widget.ui.applyButton.click()  # the scene closed during a run: nothing arrives anywhere
        self.assertTrue(widget.logic.isRunning)
        slicer.mrmlScene.Clear()
        self.assertFalse(widget.logic.isRunning)
        newcomer, _, _ = _sphere_volume("Another patient", (12, 24, 16))
        time.sleep(2.0)
        slicer.app.processEvents()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)
        self.assertIsNone(widget.logic.lastResult)

        if install.plan_install(requirements=install.requirements_for(True)).needed or install.torch_problem(
                install.torch_version()):  # never installed or downloaded by a test: run where they are
            self.delayDisplay("SAM2FewShot self-test passed (Propagate and Refine skipped: PyTorch or SAM2's "
                              "packages are not installed)")
            return
        settings = qt.QSettings()  # the steps below change remembered choices: put every one back
        remembered = {name: settings.value(SETTINGS + name) for name in REMEMBERED}
        try:
            self.model_steps(widget, newcomer, messages)
        finally:
            widget.logic.developerChoices = {}
            for name, value in remembered.items():
                if value is None:
                    settings.remove(SETTINGS + name)
                else:
                    settings.setValue(SETTINGS + name, value)
        self.delayDisplay("SAM2FewShot self-test passed")

    def model_steps(self, widget, newcomer, messages):
        """Propagate and Refine on random weights: nothing is downloaded (no weights file is needed)."""
        widget.logic.developerChoices = {"random_weights": True, "image_size": 256, "device": "cpu"}
        combo = widget.ui.precisionComboBox  # Precision: the choices offered, and the one picked reaches the run
        self.assertEqual([combo.itemText(n) for n in range(combo.count)], list(panel.PANEL_PRECISIONS))
        combo.currentText = "fp32"
        self.assertEqual(widget._parameterNode.precision, "fp32")
        self.assertEqual(widget.logic.choices(widget._parameterNode).precision, "fp32")
        truth_left = np.asarray(slicer.util.arrayFromVolume(newcomer)) > 150
        prompts = np.zeros_like(truth_left)
        prompts[[9, 15]] = truth_left[[9, 15]]
        drawn = _segmentation("Prompts", newcomer, (prompts,))
        p = widget._parameterNode
        p.queryVolume, p.supportSegmentation, p.method = newcomer, drawn, MethodChoice.propagate
        self.click_and_wait(widget, widget.ui.applyButton, messages)  # Propagate from masks on two slices
        output = widget.logic.outputSegmentation()
        segment_id = widget.logic.lastResult.segment_ids[0]
        result = slicer.util.arrayFromSegmentBinaryLabelmap(output, segment_id, newcomer)
        for k in (9, 15):  # mask-prompted slices come back verbatim
            np.testing.assert_array_equal(result[k] > 0, prompts[k])
        corrected = result.copy()
        corrected[4] = truth_left[4]  # the user corrects slice 4 with the Segment Editor
        slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), output, segment_id, newcomer)
        self.click_and_wait(widget, widget.ui.refineButton, messages)
        refined = slicer.util.arrayFromSegmentBinaryLabelmap(output, segment_id, newcomer)
        for k in (4, 9, 15):  # the correction and the original prompts are all kept
            np.testing.assert_array_equal(refined[k] > 0, corrected[k] > 0)

    def test_effect_click_path(self):
        """The Segment Editor's SAM2 effect, as a user clicks (effect_selftest.py), where PyTorch and SAM2's
        packages are installed; random weights, so nothing is downloaded."""
        from SAM2FewShotPanel.effect_selftest import walk_effect

        slicer.util.selectModule("SAM2FewShot")
        logic = slicer.modules.sam2fewshot.widgetRepresentation().self().logic
        if logic is None or install.plan_install(requirements=install.requirements_for(True)).needed or \
                install.torch_problem(install.torch_version()):
            self.delayDisplay("SAM2 effect self-test skipped: PyTorch or SAM2's packages are not installed")
            return
        self.addCleanup(setattr, logic, "developerChoices", dict(logic.developerChoices))
        logic.developerChoices = {"random_weights": True, "image_size": 256, "device": "cpu"}
        walk_effect(self, logic)
        self.delayDisplay("SAM2 effect self-test passed")

    def test_review_walk(self):
        """A registration batch of two cases, reviewed in the panel as a user clicks."""
        from SAM2FewShotLib.batch.review import case_files
        from SAM2FewShotLib.cli.main import main
        from SAM2FewShotLib.io.volume import LabelMap, Segment
        from SAM2FewShotLib.io.volume_io import read_labels, write_labels
        from SAM2FewShotLib.slicer.mrml_volume import volume_from_node

        slicer.util.selectModule("SAM2FewShot")
        widget = slicer.modules.sam2fewshot.widgetRepresentation().self()
        section, ui = widget.reviewSection, widget.ui
        if section is None:
            self.skipTest("the panel is disabled on this Slicer (its host problem is shown at the top)")
        root = Path(tempfile.mkdtemp(prefix="sam2fewshot-selftest-"))
        for name, centre in (("a", (12, 24, 16)), ("b", (12, 26, 18)), ("s", (12, 22, 14))):
            node, left, right = _sphere_volume(name, centre)
            slicer.util.saveNode(node, str(root / f"{name}.nrrd"))
        # The support's labels as a plain label map and its sidecar (io/volume_io), not .seg.nrrd: reading that
        # needs slicerio, which a fresh Slicer does not ship, and this walk runs there too.
        segments = (Segment(1, "Left", (0.9, 0.3, 0.2)), Segment(2, "Right", (0.2, 0.6, 0.9)))
        write_labels(LabelMap(volume_from_node(node).with_array((left + 2 * right).astype(np.uint8)), segments),
                     root / "s-labels.nrrd")
        (root / "list.csv").write_text("query,id\n" + "".join(f"{root / n}.nrrd,{n}\n" for n in "ab"))
        support = [str(root / "s.nrrd"), str(root / "s-labels.nrrd")]
        self.assertEqual(main(["batch", "--queries", str(root / "list.csv"), "--out", str(root / "out"), "--method",
                               "registration", "--support", *support, "-q"]), 0)
        slicer.mrmlScene.Clear()
        mine, _, _ = _sphere_volume("My own volume", (12, 24, 16))

        ui.reviewFolderLineEdit.currentPath = str(root / "out")  # as chosen with Browse
        section.openFolder(str(root / "out"))
        self.assertEqual(ui.reviewTableWidget.rowCount, 2)
        section.onCaseClicked(0, 0)  # select the case that needs a look first
        case = section.cohort.loaded
        self.assertIsNotNone(case, ui.reviewStatusLabel.text)
        self.assertTrue(ui.acceptCorrectedButton.enabled)
        if not case.flagged:  # registration is sure of every slice: check two, as a SAM2 run would flag them
            case.flagged = [5, 9]
        ui.nextFlaggedButton.click()
        self.assertIn("flagged slice 5", ui.reviewStatusLabel.text)
        centre = panel.slice_center_ras(case.labels.volume.ijk_to_ras(), case.labels.volume.array.shape, case.axis, 5)
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()  # axial: its offset is S
        self.assertAlmostEqual(red.GetSliceOffset(), centre[2], places=3)
        segment_id = case.segmentation_node.GetSegmentation().GetNthSegmentID(0)
        edited = slicer.util.arrayFromSegmentBinaryLabelmap(case.segmentation_node, segment_id, case.volume_node)
        edited[5] = 0
        edited[5, 2:6, 2:6] = 1  # the reviewer's correction on the flagged slice
        slicer.util.updateSegmentBinaryLabelmapFromArray(edited, case.segmentation_node, segment_id, case.volume_node)
        ui.acceptCorrectedButton.click()
        self.assertIn("correction saved", ui.reviewStatusLabel.text)
        saved = read_labels(case_files(root / "out", case.case).corrected).volume.array
        np.testing.assert_array_equal(saved[5] == case.labels.segments[0].value, edited[5] > 0)
        self.assertIs(slicer.mrmlScene.GetNodeByID(mine.GetID()), mine)  # the user's own node untouched
        self.delayDisplay("SAM2FewShot review self-test passed")
