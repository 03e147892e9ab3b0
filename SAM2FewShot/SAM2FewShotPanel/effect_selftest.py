"""The self-test's walk of the Segment Editor's SAM2 effect (SAM2FewShotEffect/), as a user clicks.

A synthetic volume, a segmentation with one empty segment, the SAM2 effect selected in the Segment Editor,
mouse events sent to the Red slice view's interactor (slicer.util.clickAndDrag) and keys to it: a click
(include), a Shift+click (exclude), a box dragged on another slice, P (Propagate), the editor's Undo, C
(Clear prompts), then another effect (the prompts leave the views). The random-weight SAM2 architecture
(the caller sets the Logic's developerChoices): nothing is downloaded. The layout is put back after.
"""

import time

import numpy as np
import slicer
import vtk

from SAM2FewShotLib.slicer.mrml_volume import matrix_to_numpy

TIMEOUT_S = 600


def _volume():
    zz, yy, xx = np.mgrid[:24, :48, :48]
    sphere = (zz - 12) ** 2 + (yy - 24) ** 2 + (xx - 16) ** 2 < 64
    noise = np.random.default_rng(7).normal(0, 15, sphere.shape)
    node = slicer.util.addVolumeFromArray((sphere * 400.0 - 100 + noise).astype(np.int16), name="SAM2 effect query")
    node.SetSpacing(1.0, 1.0, 2.0)
    return node


def walk_effect(test, logic):
    """Clicks, a box, Propagate, Undo and Clear through the effect; ``test`` asserts."""
    from SAM2FewShotEffect import EFFECT_NAME, registerEffect

    layout = slicer.app.layoutManager()
    old_layout = layout.layout
    try:
        _walk(test, logic, layout, EFFECT_NAME, registerEffect)
    finally:
        if getattr(logic, "clickSession", None) is not None:
            logic.clickSession.close()
        layout.setLayout(old_layout)


def _walk(test, logic, layout, name, register):
    volume = _volume()
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SAM2 effect segments")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = seg.GetSegmentation().AddEmptySegment("Sphere", "Sphere", (0.9, 0.3, 0.2))
    layout.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
    slicer.util.setSliceViewerLayers(background=volume, fit=True)
    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    editor.setSegmentationNode(seg)
    editor.setSourceVolumeNode(volume)
    editor.setCurrentSegmentID(segment_id)
    if editor.effectByName(name) is None:  # the module came after startup: register it now
        register()
        slicer.app.processEvents()
    test.assertIsNotNone(editor.effectByName(name), "the SAM2 effect is not in the Segment Editor")
    editor.setActiveEffectByName(name)
    effect = editor.activeEffect().self()
    red = layout.sliceWidget("Red")
    view = red.sliceView()
    ijk = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk)
    ijk = matrix_to_numpy(ijk)

    def ras(i, j, k):
        return (ijk @ [i, j, k, 1.0])[:3]

    def show(k):
        red.sliceLogic().SetSliceOffset(float(ras(0, 0, k)[2]))  # axial: the offset is S
        slicer.app.processEvents()

    def xy(point):
        return tuple(effect.rasToXy(point, red))

    def settle():
        session, deadline = getattr(logic, "clickSession", None), time.monotonic() + TIMEOUT_S
        test.assertIsNotNone(session, effect.statusLabel.text)  # the click was refused: the status line says why
        while session.busy:
            test.assertLess(time.monotonic(), deadline, "SAM2 did not answer in time")
            slicer.app.processEvents()
            time.sleep(0.05)
        slicer.app.processEvents()
        return session

    def labels():
        return slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, volume).copy()

    def key(symbol):
        interactor = view.interactorStyle().GetInteractor()
        interactor.SetKeySym(symbol)
        interactor.KeyPressEvent()
        slicer.app.processEvents()

    show(12)
    slicer.util.clickAndDrag(view, start=xy(ras(16, 24, 12)), end=xy(ras(16, 24, 12)), steps=1)  # include
    session = settle()
    test.assertIsNotNone(session.last_mask, effect.statusLabel.text)
    clicked = labels()
    test.assertEqual(int(clicked[12].sum()), session.last_mask["voxels"])
    test.assertFalse(np.delete(clicked, 12, axis=0).any(), "a click wrote beyond its slice")
    slicer.util.clickAndDrag(view, start=xy(ras(3, 3, 12)), end=xy(ras(3, 3, 12)), steps=1, modifiers=["Shift"])
    settle()
    test.assertEqual([m.kind for m in session.marks(seg, segment_id)], ["include", "exclude"])
    test.assertGreater(effect.pipelines[red].polyData.GetNumberOfLines(), 0, "the prompts are not shown")
    show(6)
    slicer.util.clickAndDrag(view, start=xy(ras(8, 16, 6)), end=xy(ras(26, 32, 6)), steps=6)  # a box
    settle()
    test.assertEqual(session.user_slices(seg, segment_id), {6: "click", 12: "click"})
    clicked = labels()
    key("p")  # Propagate
    settle()
    test.assertTrue(session.message.startswith("Propagated Sphere"), session.message)
    propagated = labels()
    np.testing.assert_array_equal(propagated[[6, 12]], clicked[[6, 12]])  # the prompted slices, verbatim
    editor.undo()  # Ctrl+Z: the Segment Editor's own undo takes the propagation back
    np.testing.assert_array_equal(labels(), clicked)
    editor.undo()  # Ctrl+Z again: the box on slice 6 taken back, its rectangle leaves the view
    deadline = time.monotonic() + 1.0  # the marks follow once the segmentation's change events settle
    while time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.05)
    test.assertEqual([m.t for m in session.marks(seg, segment_id)], [12, 12])
    test.assertEqual(effect.pipelines[red].polyData.GetNumberOfLines(), 0, "an undone box is still shown")
    key("c")  # Clear prompts
    test.assertEqual((session.user_slices(seg, segment_id), session.marks(seg, segment_id)), ({}, []))
    test.assertEqual(effect.pipelines[red].polyData.GetNumberOfLines(), 0)
    editor.setActiveEffectByName("Paint")  # leaving the effect: its prompts leave the views
    test.assertEqual(effect.pipelines, {})
    test.assertTrue(session.is_open, "leaving the effect keeps the session warm")
