"""The SAM2 effect's logic headless: Slicer's real MRML (slicer-core), the panel's RunController and its
real worker process (one for the module), the real sam2.1 tiny architecture with random weights at 128 px.
What a click, a drawn correction, Propagate, Clear and the session's end do, minus the Qt timer and the
mouse (the tests call poll() as the effect's timer would, and give world positions as its views would)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest

from mrml_oracle import require_mrml
from phantoms import OBLIQUE, REPO, phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap
from SAM2FewShotLib.slicer.click_geometry import SlicePoint, box_on_slice, plane_for_axis, to_slice, view_axis
from SAM2FewShotLib.slicer.click_prompts import SegmentRecord
from SAM2FewShotLib.slicer.panel import PanelChoices, slice_digests

slicer = require_mrml()

from SAM2FewShotLib.run import session_protocol as sp  # noqa: E402
from SAM2FewShotLib.run.client import WorkerClient, WorkerError  # noqa: E402
from SAM2FewShotLib.slicer.click_session import PANEL_RUNNING, ClickSession  # noqa: E402
from SAM2FewShotLib.slicer.mrml_segments import (  # noqa: E402 - once slicer-core is known to be there
    add_labels_to_segmentation,
    labels_from_segmentation,
    register_segmentation_converters,
    write_segments,
)
from SAM2FewShotLib.slicer.mrml_volume import node_ijk_to_ras, volume_to_node  # noqa: E402
from SAM2FewShotLib.slicer.runs import RunController  # noqa: E402
from SAM2FewShotLib.slicer.segment_slices import read_segment, read_slice, write_slice  # noqa: E402

SHAPE = (8, 32, 32)  # 8 slices along k (3 mm): the session's axis in an axial view
CHOICES = PanelChoices(device="cpu", random_weights=True, image_size=128)


def unit(v):
    return v / np.linalg.norm(v)


def view(ijk_to_ras, axis: int, t: float = 0.0, tilt_degrees: float = 0.0) -> np.ndarray:
    """The SliceToRAS of a view showing slice ``t`` along numpy ``axis`` (tilted about its first in-plane axis)."""
    rows, columns = [a for a in range(3) if a != axis]
    m = np.eye(4)
    x, y, n = (unit(ijk_to_ras[:3, 2 - a]) for a in (columns, rows, axis))
    c, s = np.cos(np.deg2rad(tilt_degrees)), np.sin(np.deg2rad(tilt_degrees))
    m[:3, 0], m[:3, 1], m[:3, 2] = x, c * y + s * n, c * n - s * y
    centre = [15.5, 15.5, 15.5]
    centre[2 - axis] = t
    m[:3, 3] = (ijk_to_ras @ [*centre, 1.0])[:3]
    return m


def ras_of(ijk_to_ras, axis: int, t: int, x: float, y: float) -> np.ndarray:
    """The world position of column x, row y of slice t along ``axis``."""
    kji = [0.0, 0.0, 0.0]
    rows, columns = [a for a in range(3) if a != axis]
    kji[axis], kji[rows], kji[columns] = t, y, x
    return (ijk_to_ras @ [kji[2], kji[1], kji[0], 1.0])[:3]


def settle(session: ClickSession, timeout: float = 60.0) -> None:
    """Poll as the effect's timer does until nothing is on its way."""
    deadline = time.monotonic() + timeout
    while session.poll():
        assert time.monotonic() < deadline, "the worker did not answer in time"
        time.sleep(0.01)


def status(session: ClickSession) -> dict:
    """The worker's answer to a session_status (the effect shows none: it is not waited for by ``busy``)."""
    before, deadline = session.info, time.monotonic() + 30
    session.request_status()
    while session.info is before:
        session.poll()
        assert time.monotonic() < deadline, "no status came"
        time.sleep(0.01)
    return session.info


def segmentation(scene, volume_node, names=("tumour", "other")):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segments")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    ids = [node.GetSegmentation().AddEmptySegment(n, n, (0.8, 0.2, 0.2)) for n in names]
    return node, ids


@pytest.fixture(scope="module")
def world():
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    image, truth = phantom(SHAPE, spacing=(1.0, 1.0, 3.0))
    volume_node = volume_to_node(image, scene, "query")

    def client():  # as the Logic does with PythonSlicer; one torch thread on this shared machine
        return WorkerClient(python=sys.executable, pythonpath=[REPO / "SAM2FewShot"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    runs = RunController(scene, client)
    changes = []  # (segmentation node, its segments as they were) at each before_change: the undo states

    def before_change(node):
        changes.append((node, labels_from_segmentation(node, image).volume.array.copy()))

    session = ClickSession(scene, runs, lambda: CHOICES, before_change=before_change, pause_s=0.05)
    yield dict(scene=scene, image=image, truth=truth, volume=volume_node, runs=runs, session=session,
               changes=changes, ijk=node_ijk_to_ras(volume_node))
    session.shutdown()
    runs.shutdown()


@pytest.fixture
def fresh(world):
    """A segmentation of this test's own, no prompt left from another test, the records of changes emptied."""
    world["session"].clear() if world["session"].records else None
    world["changes"].clear()
    node, ids = segmentation(world["scene"], world["volume"])
    return {**world, "seg": node, "ids": ids}


def click(w, t, x, y, include=True, segment=0):
    return w["session"].click(w["volume"], w["seg"], w["ids"][segment], view(w["ijk"], 0, t),
                              ras_of(w["ijk"], 0, t, x, y), include)


def test_prompt_bookkeeping_per_slice_drawn_undone_and_propagated():
    """The record alone: which slices are the user's before each Propagate."""
    empty = slice_digests(np.zeros((1, 4, 4), bool), 0)[0]
    mask = np.zeros((5, 4, 4), bool)
    record = SegmentRecord(None, "s", 1, 5, empty)
    mask[1, 1:3, 1:3] = True  # a click's mask on slice 1
    record.clicked(1, empty, slice_digests(mask, 0)[1])
    mask[3, 0, 0] = True  # drawn with another effect
    review = record.review(mask, 0)
    assert (review.cleared, list(review.drawn)) == ([], [3]) and record.user_slices() == {1: "click", 3: "drawn"}
    assert np.array_equal(review.drawn[3], mask[3])
    before = review.digests
    propagated = mask.copy()
    propagated[[0, 2, 4], 2, 2] = True  # a propagation fills the other slices: not the user's
    record.propagated(before, slice_digests(propagated, 0))
    assert list(record.review(propagated, 0).drawn) == [] and record.user_slices() == {1: "click", 3: "drawn"}
    corrected = propagated.copy()
    corrected[4] = False  # the user erases slice 4: absent there, a prompt now
    assert list(record.review(corrected, 0).drawn) == [4]
    undone = corrected.copy()
    undone[1] = False  # Ctrl+Z of the click: back to what slice 1 was, its prompt is cleared
    assert record.review(undone, 0).cleared == [1] and 1 not in record.user_slices()
    record2 = SegmentRecord(None, "s", 2, 5, empty)
    record2.propagated(slice_digests(mask, 0), slice_digests(propagated, 0))
    assert list(record2.review(mask, 0).drawn) == [1, 3]  # the propagation undone: the slices before are drawn
    record2.forget_prompts(slice_digests(mask, 0))
    assert record2.review(mask, 0).drawn == {} and record2.user_slices() == {}


def test_ras_to_slice_on_an_oblique_volume_and_view_alignment():
    image, _ = phantom(SHAPE, spacing=(0.9, 1.1, 2.5), direction=OBLIQUE)
    scene = slicer.vtkMRMLScene()
    ijk = node_ijk_to_ras(volume_to_node(image, scene, "oblique"))
    assert np.allclose(ijk, image.ijk_to_ras())
    for axis in range(3):
        assert view_axis(view(ijk, axis), ijk) == axis
        assert view_axis(view(ijk, axis, tilt_degrees=5.0), ijk) is None  # an oblique reformat
        assert plane_for_axis(image, axis) is not None
        for t, x, y in ((1, 3.25, 6.5), (5, 0.0, 2.0)):
            p = to_slice(ras_of(ijk, axis, t, x, y), ijk, axis, SHAPE)
            assert (p.t, p.x, p.y) == pytest.approx((t, x, y))
    with pytest.raises(InputError, match="outside the volume"):
        to_slice(ras_of(ijk, 0, 2, 40.0, 3.0), ijk, 0, SHAPE)
    assert box_on_slice(SlicePoint(2, 9.0, 1.0), SlicePoint(2, 3.0, 4.0)) == (2, (3.0, 1.0, 9.0, 4.0))


def test_a_click_writes_its_slice_only_and_a_second_click_uses_cached_features(fresh):
    w = fresh
    session, seg, segment = w["session"], w["seg"], w["ids"][0]
    other = np.zeros(SHAPE, bool)
    other[3:5, 2:6, 2:6] = True  # the other segment: never touched
    write_slice(seg, w["ids"][1], w["image"], 0, 3, other[3])
    point = click(w, 2, 12.0, 10.0)
    assert (point.t, point.x, point.y) == pytest.approx((2, 12.0, 10.0))
    settle(session)
    assert session.message.startswith("tumour, slice 2:"), session.message
    mask = read_segment(seg, segment, w["image"])
    assert mask[2].sum() == session.last_mask["voxels"] and not mask[[0, 1, 3, 4, 5, 6, 7]].any()
    assert np.array_equal(read_segment(seg, w["ids"][1], w["image"])[3], other[3])
    assert [node for node, _ in w["changes"]] == [seg] and not w["changes"][0][1][2].any()  # saved before the write
    deadline = time.monotonic() + 60
    while status(session)["encoding"]:  # background encoding of the 8 slices
        assert time.monotonic() < deadline
        time.sleep(0.05)
    encoded = session.info["frames_encoded"]
    assert encoded == 8
    click(w, 5, 20.0, 14.0)
    click(w, 5, 3.0, 3.0, include=False)
    settle(session)
    assert not session.last_mask["encoded_now"] and session.last_mask["decoder_ms"] > 0
    assert status(session)["frames_encoded"] == encoded  # answered from the cached features: no encoder call
    assert session.user_slices(seg, segment) == {2: "click", 5: "click"}
    obj = str(session.records[(seg.GetID(), segment)].obj)
    assert session.info["prompts"][obj] == {"2": "click", "5": "click"}  # the worker's own record agrees
    assert [m.kind for m in session.marks(seg, segment)] == ["include", "include", "exclude"]
    assert len(w["changes"]) == 3


def test_a_click_taken_back_with_undo_is_forgotten_and_a_drawn_over_slice_is_refined(fresh):
    """Ctrl+Z after clicks: the next click there starts afresh (it does not refine the undone ones) and their
    points are no longer shown; drawn over with another effect: the next click refines the drawing."""
    w = fresh
    session, seg, segment = w["session"], w["seg"], w["ids"][0]
    record_of = lambda: session.records[(seg.GetID(), segment)]  # noqa: E731

    def clicks_on_3(*points):
        for x, y, include in points:
            click(w, 3, x, y, include)
        settle(session)
        return read_segment(seg, segment, w["image"])[3]

    drawn = np.zeros(SHAPE[1:], bool)
    drawn[8:20, 8:20] = True
    assert clicks_on_3((12.0, 10.0, 1), (4.0, 4.0, 0)).any()
    write_slice(seg, segment, w["image"], 0, 3, np.zeros(SHAPE[1:], bool))  # Ctrl+Z twice: as before the clicks
    assert session.marks(seg, segment) == []  # their points are no longer shown
    click(w, 3, 20.0, 20.0, include=False)
    assert [(m.t, m.kind) for m in session.marks(seg, segment)] == [(3, "exclude")]  # shown before SAM2 answers
    settle(session)
    again = read_segment(seg, segment, w["image"])[3]
    assert [(m.t, m.kind) for m in session.marks(seg, segment)] == [(3, "exclude")]
    write_slice(seg, segment, w["image"], 0, 3, drawn)  # corrected with another effect (Paint, Erase)
    assert session.marks(seg, segment) == []
    refined = clicks_on_3((14.0, 14.0, 1))
    assert session.user_slices(seg, segment) == {3: "click"}

    session.clear()  # the references, from a worker that forgot every prompt
    settle(session)
    write_slice(seg, segment, w["image"], 0, 3, drawn)
    session.send("mask", lambda i, s: sp.SessionMask(id=i, session=s, slice=3, object=record_of().obj,
                                                      shape=drawn.shape, bits=sp.pack_mask(drawn)))
    assert np.array_equal(clicks_on_3((14.0, 14.0, 1)), refined)  # the click refined the drawing
    session.clear()
    settle(session)
    assert np.array_equal(clicks_on_3((20.0, 20.0, 0)), again)  # the undone clicks played no part


def test_views_that_are_not_the_session_plane_and_a_running_panel_are_refused(fresh):
    w = fresh
    session, ijk = w["session"], w["ijk"]
    click(w, 4, 10.0, 10.0)
    with pytest.raises(InputError, match="obliquely"):
        session.click(w["volume"], w["seg"], w["ids"][0], view(ijk, 0, 4, tilt_degrees=10), ras_of(ijk, 0, 4, 9, 9))
    with pytest.raises(InputError, match="shows sagittal slices and the SAM2 prompts are on axial slices"):
        session.click(w["volume"], w["seg"], w["ids"][0], view(ijk, 2, 12), ras_of(ijk, 2, 12, 4, 4))
    w["runs"].run = object()  # a panel run in progress
    try:
        with pytest.raises(InputError) as refused:
            click(w, 4, 12.0, 12.0)
        assert str(refused.value) == PANEL_RUNNING
        with pytest.raises(InputError, match="running in the panel"):
            session.propagate()
    finally:
        w["runs"].run = None
    settle(session)


def test_propagate_from_clicks_on_two_slices_writes_the_segment_and_propagated_slices_stay_not_the_users(fresh):
    w = fresh
    session, seg, segment = w["session"], w["seg"], w["ids"][0]
    click(w, 1, 14.0, 9.0)
    session.box(w["volume"], seg, segment, view(w["ijk"], 0, 6), ras_of(w["ijk"], 0, 6, 8, 4),
                ras_of(w["ijk"], 0, 6, 22, 16))
    settle(session)
    clicked = read_segment(seg, segment, w["image"])
    changes = len(w["changes"])
    session.propagate()
    settle(session)
    assert session.message.startswith("Propagated tumour (from slices 1, 6)"), session.message
    (node, undo_state), = w["changes"][changes:]  # one undo state, taken before the propagation's write
    assert node is seg and np.array_equal(undo_state == 1, clicked)
    result = read_segment(seg, segment, w["image"])
    assert np.array_equal(result[[1, 6]], clicked[[1, 6]])  # the clicked slices, verbatim
    assert not read_segment(seg, w["ids"][1], w["image"]).any()  # the segment not prompted: untouched
    session.propagate()  # again, nothing changed: the propagated slices are no prompts
    settle(session)
    assert session.user_slices(seg, segment) == {1: "click", 6: "click"}
    assert np.array_equal(read_segment(seg, segment, w["image"]), result)


def test_propagate_from_a_click_and_a_drawn_mask(fresh):
    w = fresh
    session, seg, segment = w["session"], w["seg"], w["ids"][0]
    click(w, 2, 12.0, 10.0)
    settle(session)
    drawn = w["truth"].volume.array == 1  # the user draws slice 5 with another effect (the editor's labels)
    labels = labels_from_segmentation(seg, w["image"], [segment])
    array = labels.volume.array.copy()
    array[5] = drawn[5]
    write_segments(seg, LabelMap(labels.volume.with_array(array), labels.segments), {1: segment})
    clicked = read_slice(seg, segment, w["image"], 0, 2)
    session.propagate()
    settle(session)
    assert session.user_slices(seg, segment) == {2: "click", 5: "drawn"}
    result = read_segment(seg, segment, w["image"])
    assert np.array_equal(result[5], drawn[5]) and np.array_equal(result[2], clicked)
    corrected = result.copy()
    corrected[7] = False
    corrected[7, 1:4, 1:4] = True  # a correction after the propagation: the user's slice for the next one
    write_slice(seg, segment, w["image"], 0, 7, corrected[7])
    session.propagate()
    settle(session)
    assert session.user_slices(seg, segment) == {2: "click", 5: "drawn", 7: "drawn"}
    assert np.array_equal(read_segment(seg, segment, w["image"])[7], corrected[7])
    session.clear()
    settle(session)
    assert session.user_slices(seg, segment) == {} and session.marks(seg, segment) == []
    with pytest.raises(InputError, match="nothing to propagate"):
        session.propagate()


def worker_scratch(client) -> list[str]:
    return [f.path for f in psutil.Process(client.pid).open_files() if "sam2fewshot-" in os.path.basename(f.path)]


def closed_on_worker(client, session_id) -> str:
    request_id = client.submit(sp.SessionStatus(id=f"q{time.time_ns()}", session=session_id))
    with pytest.raises(WorkerError) as info:
        client.wait(request_id, timeout=30)
    return str(info.value)


def test_the_session_ends_with_its_volume_and_the_scene_leaving_nothing(world, fresh):
    w = fresh
    session, scene = w["session"], w["scene"]
    click(w, 3, 10.0, 10.0)
    settle(session)
    first = session.session_id
    panel_keeps = w["runs"].volumes.kept  # the panel's runs keep their last volumes (another test's Apply)
    files = [f for f in session.store.folder.glob("*.nrrd") if f not in panel_keeps()]
    assert len(files) <= 1 and session.store.folder.parent.name == "jobs"  # written once, in the cache's jobs folder
    files = session.volume_files
    assert len(files) == 1
    image, _ = phantom(SHAPE, spacing=(0.9, 1.1, 2.5), direction=OBLIQUE, seed=4)
    other = volume_to_node(image, scene, "oblique patient")  # another volume: the session moves there
    ijk = node_ijk_to_ras(other)
    seg, ids = segmentation(scene, other)
    session.click(other, seg, ids[0], view(ijk, 0, 4), ras_of(ijk, 0, 4, 16.0, 16.0))
    assert session.user_slices(w["seg"], w["ids"][0]) == {}
    assert files[0].exists() == (files[0] in panel_keeps())  # the session's file is gone unless the panel keeps it
    settle(session)
    client = w["runs"].client
    assert session.session_id != first and "is not open" in closed_on_worker(client, first)
    written = read_segment(seg, ids[0], image)  # the oblique volume's own slice 4, and nothing else
    assert written[4].sum() == session.last_mask["voxels"] and not written[[0, 1, 2, 3, 5, 6, 7]].any()
    volume_to_node(image.with_array(image.array + 1.0), scene, "x", node=other)  # its voxels change
    session.click(other, seg, ids[0], view(ijk, 0, 2), ras_of(ijk, 0, 2, 16.0, 16.0))
    settle(session)
    second, folder = session.session_id, session.store.folder
    assert second not in (first, None) and len([f for f in folder.glob("*.nrrd") if f not in panel_keeps()]) == 1
    scene.Clear(0)  # File > Close scene
    assert session.session_id is None and session.records == {}
    time.sleep(0.5)
    settle(session)
    assert "no live session is open" in closed_on_worker(client, second)
    assert not folder.exists() and session.store.folder is None  # no volume file left
    cache = Path(client.base_env["SAM2FEWSHOT_CACHE"])
    assert not [p for p in cache.glob("scratch/*")] and worker_scratch(client) == []
    world["volume"] = volume_to_node(w["image"], scene, "query")  # the module's scene as the other tests expect it
    world["ijk"] = node_ijk_to_ras(world["volume"])


def test_a_panel_apply_on_the_clicked_volume_writes_and_encodes_nothing_again(fresh):
    """Issue 25, item 3: one volume file and one set of features serve the effect's session and the panel."""
    w = fresh
    session, runs, scene = w["session"], w["runs"], w["scene"]
    click(w, 3, 10.0, 10.0)
    settle(session)
    deadline = time.monotonic() + 60
    while status(session)["encoding"]:  # every slice encoded in the background
        assert time.monotonic() < deadline, "background encoding did not finish"
        time.sleep(0.1)
    [volume_file] = session.store.folder.glob("*.nrrd")
    written = volume_file.stat().st_ino, volume_file.stat().st_mtime_ns
    prompt = np.zeros_like(w["truth"].volume.array)
    prompt[4] = w["truth"].volume.array[4]
    prompts = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "panel prompts")
    ids = add_labels_to_segmentation(prompts, LabelMap(w["truth"].volume.with_array(prompt), w["truth"].segments),
                                     w["volume"])
    finished = []
    runs.on_finished = lambda ok, message: finished.append((ok, message))
    try:
        runs.start_run(replace(CHOICES, method="propagate"), w["volume"], prompts, ids)
        deadline = time.monotonic() + 120
        while runs.poll():
            assert time.monotonic() < deadline, "the panel's run did not end"
            time.sleep(0.02)
    finally:
        runs.on_finished = lambda ok, message: None
    assert finished and finished[-1][0], finished
    assert "(0 slices encoded, warm worker)" in finished[-1][1], finished[-1][1]  # the session's features
    assert list(session.store.folder.glob("*.nrrd")) == [volume_file]  # the session's file, not written again
    assert runs.volumes is session.store and runs.volumes.kept() == [volume_file]  # and the panel's run read it
    assert (volume_file.stat().st_ino, volume_file.stat().st_mtime_ns)[0] == written[0]
    click(w, 5, 12.0, 10.0)  # the session goes on after the panel's run, on the same features
    settle(session)
    assert session.last_mask is not None and not session.last_mask["encoded_now"]
    assert status(session)["frames_encoded"] == SHAPE[0]


def test_a_worker_stopped_under_a_click_gets_the_session_and_the_users_slices_back(fresh):
    w = fresh
    session, seg, segment = w["session"], w["seg"], w["ids"][0]
    click(w, 1, 12.0, 10.0)
    settle(session)
    first = session.session_id
    click(w, 6, 12.0, 10.0)
    w["runs"].client.cancel()  # a panel run cancelled: the worker's process tree is killed, the click with it
    w["runs"].client.join_reapers(10)
    settle(session, timeout=120)
    assert session.session_id not in (None, first) and session.message.startswith("tumour, slice 6:")
    assert session.user_slices(seg, segment) == {1: "click", 6: "click"}
    obj = str(session.records[(seg.GetID(), segment)].obj)
    assert status(session)["prompts"][obj] == {"1": "drawn", "6": "click"}  # slice 1 sent back as its mask


def test_the_shared_client_keeps_each_sides_events():
    from SAM2FewShotLib.slicer.shared_client import SharedClient, shared

    class Fake:
        def __init__(self):
            self.queue, self.pending = [], []

        def submit(self, request):
            self.pending.append(request["id"])
            return request["id"]

        def poll(self):
            events, self.queue = self.queue, []
            return events

    class Runs:
        client_factory, client = Fake, None

    runs = Runs()
    client = shared(runs)
    assert isinstance(client, SharedClient) and shared(runs) is client
    client.submit({"id": "job"})
    client.submit({"id": "mine"}, claim=True)
    client.client.queue += [{"event": "progress", "id": "job"}, {"event": "mask", "id": "mine"},
                            {"event": "log", "id": None, "level": "info", "message": "x"},
                            {"event": "result", "id": "job"}]
    client.pump()  # the effect's timer comes first: the panel's events wait for the panel
    assert [e["id"] for e in client.take_inbox()] == ["mine"]
    assert [e["event"] for e in client.poll()] == ["progress", "log", "result"]
    assert client.poll() == [] and client.take_inbox() == []
