"""The module's self-test, run by Slicer's extension build (slicer_add_python_unittest) and by anyone
with Slicer (Reload and Test): it drives the panel itself, as a user clicks.

A synthetic scene (a query, a shifted support with a two-segment segmentation): Registration
(no torch needed) through Apply, Apply again (replaces its own segments only), Undo, the scene
closed during a run; then, when torch and sam2 are importable, Propagate and Refine with the
random-weight SAM2 architecture. Then the review of a small cohort (a registration batch): open its
folder, select a case, next flagged slice, correct it and Accept corrected.
"""

import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from SAM2FewShotLib.slicer import panel
from SAM2FewShotPanel.logic import MethodChoice

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

    def wait(self, widget):
        deadline = time.monotonic() + TIMEOUT_S
        while widget.logic.isRunning and time.monotonic() < deadline:
            slicer.app.processEvents()  # the test waits; the panel never does
            time.sleep(0.05)
        self.assertFalse(widget.logic.isRunning, "the run did not end in time")

    def test_panel_click_path(self):
        slicer.util.selectModule("SAM2FewShot")
        widget = slicer.modules.sam2fewshot.widgetRepresentation().self()
        if not widget.logic.ensureDependencies(False, lambda question: False):
            self.skipTest("SAM2FewShot's Python packages are not installed (its first use installs them)")
        query, _, _ = _sphere_volume("Query", (12, 24, 16))
        support, left, right = _sphere_volume("Support", (12, 22, 14))
        labels = _segmentation("Support labels", support, (left, right))
        messages = []
        widget.logic.finishedCallback = lambda success, message: (messages.append((success, message)),
                                                                  widget.onFinished(success, message))
        p = widget._parameterNode
        p.queryVolume, p.supportVolume, p.supportSegmentation = query, support, labels
        p.method = MethodChoice.registration

        widget.ui.applyButton.click()  # Apply: registration, no model
        self.wait(widget)
        self.assertTrue(messages[-1][0], messages[-1])
        output = widget.logic.outputSegmentation()
        names = sorted(output.GetSegmentation().GetNthSegment(n).GetName() for n in range(2))
        self.assertEqual(names, ["Left", "Right"])
        self.assertIn("added Left, Right", messages[-1][1])
        save_screenshot(query, output)  # only with $SAM2FEWSHOT_SCREENSHOTS set
        nodes = slicer.mrmlScene.GetNumberOfNodes()

        widget.ui.applyButton.click()  # Apply again: its own segments replaced, nothing added
        self.wait(widget)
        self.assertIn("replaced Left, Right", messages[-1][1])
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

        if not all(importlib.util.find_spec(m) for m in ("torch", "sam2")):
            self.delayDisplay("SAM2FewShot self-test passed (Propagate and Refine skipped: torch and sam2 absent)")
            return
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
        widget.ui.applyButton.click()  # Propagate from masks on two slices
        self.wait(widget)
        self.assertTrue(messages[-1][0], messages[-1])
        output = widget.logic.outputSegmentation()
        segment_id = widget.logic.lastResult.segment_ids[0]
        result = slicer.util.arrayFromSegmentBinaryLabelmap(output, segment_id, newcomer)
        for k in (9, 15):  # mask-prompted slices come back verbatim
            np.testing.assert_array_equal(result[k] > 0, prompts[k])
        corrected = result.copy()
        corrected[4] = truth_left[4]  # the user corrects slice 4 with the Segment Editor
        slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), output, segment_id, newcomer)
        widget.ui.refineButton.click()
        self.wait(widget)
        self.assertTrue(messages[-1][0], messages[-1])
        refined = slicer.util.arrayFromSegmentBinaryLabelmap(output, segment_id, newcomer)
        for k in (4, 9, 15):  # the correction and the original prompts are all kept
            np.testing.assert_array_equal(refined[k] > 0, corrected[k] > 0)
        self.delayDisplay("SAM2FewShot self-test passed")

    def test_review_walk(self):
        """A registration batch of two cases, reviewed in the panel as a user clicks."""
        from SAM2FewShotLib.batch.review import case_files
        from SAM2FewShotLib.cli.main import main
        from SAM2FewShotLib.io.volume_io import read_labels

        slicer.util.selectModule("SAM2FewShot")
        widget = slicer.modules.sam2fewshot.widgetRepresentation().self()
        section, ui = widget.reviewSection, widget.ui
        if section is None:
            self.skipTest("the panel is disabled on this Slicer (its host problem is shown at the top)")
        root = Path(tempfile.mkdtemp(prefix="sam2fewshot-selftest-"))
        for name, centre in (("a", (12, 24, 16)), ("b", (12, 26, 18)), ("s", (12, 22, 14))):
            node, left, right = _sphere_volume(name, centre)
            slicer.util.saveNode(node, str(root / f"{name}.nrrd"))
        labels = _segmentation("s labels", node, (left, right))
        slicer.util.saveNode(labels, str(root / "s.seg.nrrd"))
        (root / "list.csv").write_text("query,id\n" + "".join(f"{root / n}.nrrd,{n}\n" for n in "ab"))
        self.assertEqual(main(["batch", "--queries", str(root / "list.csv"), "--out", str(root / "out"), "--method",
                               "registration", "--support", str(root / "s.nrrd"), str(root / "s.seg.nrrd"), "-q"]), 0)
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
