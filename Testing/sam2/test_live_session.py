"""The live session: background encoding from the slice in view outward, clicks answered from cached features
through sam2's own interactive path, prompts per slice and object, propagation on the features already
computed, and an end that leaves no thread at work and no file. Real sam2.1 tiny, random weights, 128 px."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from phantoms import phantom
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import default_segments
from SAM2FewShotLib.methods.propagate import segment_propagate
from SAM2FewShotLib.sam2.live_session import LiveSession, outward
from SAM2FewShotLib.sam2.offload import scratch_dir
from SAM2FewShotLib.sam2.session import VolumeSession

SHAPE = (8, 32, 32)  # 8 slices along k (3 mm): the acquisition axis
PAUSE = 0.05  # a short rest after each click: the tests need not wait 2 s


@pytest.fixture(scope="module")
def volume():
    image, truth = phantom(SHAPE, spacing=(1.0, 1.0, 3.0))
    return image, truth


@pytest.fixture(autouse=True)
def one_thread():
    """Outputs compared bit for bit: one torch thread, whichever thread of ours runs the model."""
    torch.set_num_threads(1)


def live_session(predictor, image, view=0, background=True, **session_options) -> LiveSession:
    return LiveSession(VolumeSession(predictor, image, **session_options), view=view, pause_s=PAUSE,
                       background=background)


def test_slices_are_taken_from_the_view_outward():
    assert list(outward(3, 8)) == [3, 4, 2, 5, 1, 6, 0, 7]
    assert list(outward(0, 4)) == [0, 1, 2, 3] and list(outward(3, 4)) == [3, 2, 1, 0]


def test_background_encodes_every_slice_once_from_the_view_outward(small_predictor, volume):
    live = live_session(small_predictor, volume[0], view=5)
    try:
        assert live.wait_encoded(timeout=60)
        assert [t for t, _, why in live.encode_log] == list(outward(5, SHAPE[0]))
        assert live.encoded_frames == SHAPE[0] == live.encoded_count()
        assert live.background_ms_per_slice() > 0
    finally:
        live.close()


def test_a_click_is_answered_from_cached_features_by_sams_own_refining_path(small_predictor, volume):
    live = live_session(small_predictor, volume[0], view=3)
    try:
        assert live.wait_encoded(timeout=60)
        first = live.click(3, 1, points=[[15.0, 14.0]], labels=[1])
        second = live.click(3, 1, points=[[4.0, 4.0]], labels=[0])
        assert live.encoded_frames == SHAPE[0]  # no encoder call for either click
        assert not first.encoded_now and not second.encoded_now and first.encode_s == 0.0
        assert first.mask.shape == (32, 32) and first.mask.dtype == bool
        # The same two clicks, one by one on a fresh state of stock sam2 (clear_old_points=False), give these bits
        p = small_predictor
        state = p.init_volume_state(live.session.frames, cache=live.session.cache)
        with torch.inference_mode():
            p.add_new_points_or_box(state, 3, 1, points=np.array([[15.0, 14.0]], np.float32),
                                    labels=np.array([1], np.int32))
            _, _, masks = p.add_new_points_or_box(state, 3, 1, points=np.array([[4.0, 4.0]], np.float32),
                                                  labels=np.array([0], np.int32), clear_old_points=False)
        assert np.array_equal(second.mask, (masks[0, 0] > 0).numpy())
        assert live.encoded_frames == SHAPE[0]
    finally:
        live.close()


def test_a_cold_click_jumps_the_queue_and_answers_as_a_warm_one(small_predictor, volume):
    last = SHAPE[0] - 1
    live = live_session(small_predictor, volume[0], view=0)
    try:
        done = len(live.encode_log)
        cold = live.click(last, 1, points=[[16.0, 16.0]], labels=[1])
        assert cold.encoded_now and cold.encode_s > 0
        order = [t for t, _, _ in live.encode_log]
        assert order.index(last) <= done + 1, order  # at most the frame in progress went first
        assert live.wait_encoded(timeout=60)
        order = [t for t, _, _ in live.encode_log]
        assert order[order.index(last) + 1] == last - 1  # encoding goes on around the clicked slice
        assert sorted(order) == list(range(SHAPE[0]))  # every slice once
        warm = live.click(last, 2, points=[[16.0, 16.0]], labels=[1])  # another object: a first click too
        assert not warm.encoded_now and np.array_equal(cold.mask, warm.mask)
    finally:
        live.close()


def test_prompts_are_kept_per_object_and_slice(small_predictor, volume):
    live = live_session(small_predictor, volume[0], background=False)
    truth = volume[1].volume.array
    try:
        live.click(2, 1, points=[[10.0, 12.0]], labels=[1])
        live.click(2, 1, points=[[11.0, 12.0], [1.0, 1.0]], labels=[1, 0])
        live.click(2, 2, box=[15.0, 8.0, 25.0, 20.0])
        live.click(6, 1, points=[[10.0, 12.0]], labels=[1])
        live.set_mask(5, 2, truth[5] == 2)
        assert live.prompted() == {1: {2: "click", 6: "click"}, 2: {2: "click", 5: "drawn"}}
        assert live._prompts[(2, 1)].clicks == 2 and live._prompts[(2, 2)].clicks == 1
        prompts = {(p.frame, p.obj_id): p for p in live.prompts()}
        assert np.array_equal(prompts[(5, 2)].mask, truth[5] == 2) and prompts[(5, 2)].kind == "mask"
        assert live.encoded_frames == 2  # only the clicked slices (2, 6): no background encoding
        live.click(5, 2, points=[[20.0, 14.0]], labels=[1])  # refines the drawn mask: a click from now on
        assert live.prompted()[2] == {2: "click", 5: "click"}
        assert live.clear(obj_id=1, frame=2) == 1 and live.prompted()[1] == {6: "click"}
        assert live.clear(obj_id=2) == 2 and live.prompted() == {1: {6: "click"}}
        assert live.clear() == 1 and live.prompts() == []
        for bad in (lambda: live.click(8, 1, points=[[1.0, 1.0]]), lambda: live.click(1, 0, points=[[1.0, 1.0]]),
                    lambda: live.click(1, 1, points=[[32.5, 1.0]]), lambda: live.click(1, 1, points=[[1.0, 1.0]],
                                                                                       labels=[2]),
                    lambda: live.click(1, 1), lambda: live.click(1, 1, box=[5.0, 5.0, 1.0, 9.0]),
                    lambda: live.set_mask(1, 1, np.zeros((31, 32), bool))):
            with pytest.raises(InputError):
                bad()
    finally:
        live.close()


def test_propagation_from_clicks_on_two_slices_reuses_every_feature(small_predictor, volume):
    live = live_session(small_predictor, volume[0], view=4)
    try:
        live.click(2, 1, points=[[12.0, 10.0]], labels=[1])
        live.click(6, 1, points=[[12.0, 10.0]], labels=[1])
        live.click(4, 2, points=[[22.0, 20.0]], labels=[1])
        with live.exclusive() as session:
            labels, report = segment_propagate(session, live.prompts(), default_segments([1, 2]))
        assert live.encoded_frames == SHAPE[0]  # background, clicks and propagation: each slice once
        slices = np.moveaxis(labels.volume.array, live.session.axis, 0)
        for t in (2, 6):  # the mask the user accepted, verbatim
            assert np.array_equal(slices[t] == 1, live._prompts[(t, 1)].mask)
        assert report["timing"]["slices_run"] == SHAPE[0]
    finally:
        live.close()


def test_propagation_from_a_click_and_a_drawn_mask(small_predictor, volume):
    truth = volume[1].volume.array
    live = live_session(small_predictor, volume[0], background=False)
    try:
        live.click(1, 1, points=[[12.0, 10.0]], labels=[1])
        live.set_mask(6, 1, truth[6] == 1)
        labels, report = segment_propagate(live.session, live.prompts(), default_segments([1]))
        assert np.array_equal(labels.volume.array[6] == 1, truth[6] == 1)  # the drawn mask, verbatim
        assert live.encoded_frames == SHAPE[0] and report["timing"]["frames_encoded"] == SHAPE[0] - 1
    finally:
        live.close()


def scratch_handles() -> list[str]:
    """This process's open files in the scratch folder (offloaded features; unlinked, but open)."""
    folder = str(scratch_dir())
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(folder):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see open files")
def test_close_stops_encoding_and_leaves_no_file(small_predictor, volume):
    live = live_session(small_predictor, volume[0], view=0, feature_budget_bytes=1)  # two frames in memory
    live.click(0, 1, points=[[16.0, 16.0]], labels=[1])
    assert live.wait_encoded(timeout=60)
    assert len(live.session.cache.spill) >= SHAPE[0] - 2 and scratch_handles()  # offloaded to scratch
    live.close()
    assert not live.encoding and live.closed
    assert scratch_handles() == [] and not any(scratch_dir().iterdir())
    with pytest.raises(InputError, match="closed"):
        live.click(0, 1, points=[[16.0, 16.0]], labels=[1])


def test_close_while_encoding_waits_only_for_the_frame_in_progress(small_predictor):
    image, _ = phantom((40, 32, 32), spacing=(1.0, 1.0, 3.0))
    live = live_session(small_predictor, image, view=20)
    done = len(live.encode_log)
    live.close()
    assert not live.encoding and len(live.encode_log) <= done + 1
