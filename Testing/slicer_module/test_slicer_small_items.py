"""Smaller Slicer-side items of issue 25, headless: the low-confidence table after a scene close, and
which modules Developer Reload drops. The table's rows are tested on Slicer's real MRML scene
(slicer-core) with a stand-in for the run control (only ``scene``, ``last``, ``low_confidence()`` and
``slice_position()`` are used); the reload list needs no Slicer at all."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mrml_oracle import require_mrml
from SAM2FewShotLib.run.reports import SliceFlag
from SAM2FewShotLib.slicer.module_reload import PACKAGES, drop_modules, modules_to_drop

FLAGS = [SliceFlag(3, "Liver", 0.5, 40, "propagated"), SliceFlag(5, "Liver", -1.0, 2, "propagated")]


def mrml():
    return require_mrml()


@pytest.fixture
def world():
    """A scene with a query volume, a result on it, and the rows listed from that result."""
    from SAM2FewShotLib.slicer.low_confidence import LowConfidenceRows

    slicer = mrml()
    scene = slicer.vtkMRMLScene()
    query = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "query")
    result = SimpleNamespace(query_node=query)
    runs = SimpleNamespace(scene=scene, last=result, low_confidence=lambda: list(FLAGS),
                           slice_position=lambda index: (0.0, 0.0, float(index)))
    rows = LowConfidenceRows(runs)
    assert rows.refresh() == FLAGS
    return SimpleNamespace(scene=scene, runs=runs, rows=rows)


def test_a_click_on_the_current_result_goes_to_its_slice(world):
    assert world.rows.target(5) == ((0.0, 0.0, 5.0), "")
    assert world.rows.rows == FLAGS


def test_after_a_scene_close_a_click_is_a_message_and_the_rows_are_gone(world):
    from SAM2FewShotLib.slicer.low_confidence import GONE

    world.scene.Clear(0)  # what File > Close Scene does to the nodes
    position, message = world.rows.target(3)  # no exception: the Qt slot would only print a traceback
    assert position is None and message == GONE
    assert world.rows.rows == [] and world.rows.refresh() == FLAGS  # the stand-in still holds a result


def test_the_run_control_forgetting_its_result_and_a_newer_result_both_empty_the_rows(world):
    from SAM2FewShotLib.slicer.low_confidence import GONE

    world.runs.last = None  # RunController.forget(), called at a scene close, or an Undo of the last result
    assert world.rows.target(3) == (None, GONE) and world.rows.rows == []
    assert world.rows.refresh() == []
    world.runs.last = SimpleNamespace(query_node=world.scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode"))
    stale = world.rows
    stale._result = SimpleNamespace(query_node=world.runs.last.query_node)  # rows of a replaced result
    assert stale.target(3) == (None, GONE)


def test_reset_empties_the_rows_and_a_failing_position_is_a_message(world):
    world.rows.reset()
    assert world.rows.rows == []
    world.rows.refresh()

    def outside(index):
        raise IndexError(f"slice {index} is outside the volume")

    world.runs.slice_position = outside
    position, message = world.rows.target(99)
    assert position is None and message.startswith("Cannot show slice 99")


def test_reload_drops_the_packages_deepest_first_and_nothing_else():
    loaded = ["SAM2FewShot", "SAM2FewShotLib", "SAM2FewShotLib.run", "SAM2FewShotLib.run.client", "numpy",
              "SAM2FewShotPanel", "SAM2FewShotPanel.logic", "SAM2FewShotLibExtra", "SAM2FewShotPanelish.x",
              "SAM2FewShotLib.slicer.module_reload", "slicer.util", "SAM2FewShotEffect",
              "SAM2FewShotEffect.SegmentEditorSAM2Effect"]
    assert PACKAGES == ("SAM2FewShotEffect", "SAM2FewShotPanel", "SAM2FewShotLib")
    assert modules_to_drop(loaded) == [
        "SAM2FewShotEffect.SegmentEditorSAM2Effect", "SAM2FewShotEffect", "SAM2FewShotPanel.logic", "SAM2FewShotPanel",
        "SAM2FewShotLib.run.client", "SAM2FewShotLib.slicer.module_reload", "SAM2FewShotLib.run", "SAM2FewShotLib"]


def test_drop_modules_removes_only_their_entries():
    modules = dict.fromkeys(["SAM2FewShot", "SAM2FewShotLib", "SAM2FewShotLib.io", "SAM2FewShotPanel",
                             "SAM2FewShotLibExtra", "os"], object())
    dropped = drop_modules(modules)
    assert set(dropped) == {"SAM2FewShotLib", "SAM2FewShotLib.io", "SAM2FewShotPanel"}
    assert sorted(modules) == ["SAM2FewShot", "SAM2FewShotLibExtra", "os"]
