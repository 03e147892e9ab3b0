"""Memory that does not grow with slices: features and pending logits offloaded to a scratch file."""

import os

import numpy as np
import pytest
import torch

from phantoms import phantom
from SAM2FewShotLib.methods.propagate import prompts_from_labels, segment_propagate
from SAM2FewShotLib.sam2 import propagation
from SAM2FewShotLib.sam2.feature_cache import FeatureCache
from SAM2FewShotLib.sam2.frames import FrameSource
from SAM2FewShotLib.sam2.offload import OffloadedDict, SpillFile
from SAM2FewShotLib.sam2.session import VolumeSession


def _frame(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 6, 6, generator=g).to(dtype), torch.randn(1, 8, 3, 3, generator=g).to(dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_spill_file_gives_back_exactly_what_it_was_given(tmp_path, dtype):
    spill = SpillFile(1 << 20, directory=tmp_path)
    frames = {i: _frame(i, dtype) for i in (3, 0, 7)}
    for i, f in frames.items():
        assert spill.put(i, f)
    assert os.listdir(tmp_path) == []  # unlinked at once: nothing left behind, even if the process is killed
    for i, f in frames.items():
        back = spill.get(i)
        assert [b.dtype for b in back] == [dtype, dtype]
        assert all(torch.equal(a, b) for a, b in zip(f, back, strict=True))
    assert spill.nbytes == 3 * sum(t.numel() * t.element_size() for t in frames[0])
    with pytest.raises(ValueError, match="same tensor layout"):
        spill.put(9, [torch.zeros(2)])
    spill.close()
    assert 3 not in spill


def test_spill_file_keeps_to_its_budget(tmp_path):
    frame_bytes = sum(t.numel() * t.element_size() for t in _frame(0))
    spill = SpillFile(2 * frame_bytes, directory=tmp_path)
    assert spill.put(0, _frame(0)) and spill.put(1, _frame(1))
    assert not spill.put(2, _frame(2)) and 2 not in spill and len(spill) == 2
    assert not SpillFile(0, directory=tmp_path).put(0, _frame(0))  # disabled


def test_spill_file_in_an_unwritable_folder_just_declines(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    spill = SpillFile(1 << 20, directory=blocker / "sub")  # a folder under a file cannot exist
    assert not spill.put(0, _frame(0)) and spill.max_bytes == 0


def test_a_full_disk_stops_offloading_and_keeps_what_was_written(tmp_path, caplog):
    import errno

    spill = SpillFile(1 << 20, directory=tmp_path)
    assert spill.put(0, _frame(0))
    real = spill._file

    class FullDisk:
        def __getattr__(self, name):
            return getattr(real, name)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    spill._file = FullDisk()
    assert not spill.put(1, _frame(1)) and spill.max_bytes == 0 and 1 not in spill
    assert "offloading stopped" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(spill.get(0), _frame(0), strict=True))


def test_offloaded_dict_keeps_the_newest_in_memory_and_the_rest_on_disk():
    values = {t: torch.randn(2, 5, 5) for t in range(10)}
    d = OffloadedDict(max_bytes=3 * values[0].numel() * 4)
    for t, v in values.items():
        d[t] = v
    assert len(d._memory) == 3 and len(d._disk) == 7 and d.keys() == list(range(10))
    for t in reversed(range(10)):  # the backward pass pops from the newest
        assert torch.equal(d.pop(t), values[t])
    assert len(d) == 0 and d.pop(4) is None


def test_offloaded_dict_keeps_in_memory_what_the_disk_refuses():
    d = OffloadedDict(max_bytes=0, spill_bytes=0)
    for t in range(4):
        d[t] = torch.full((3,), float(t))
    assert len(d._memory) == 4 and [float(d.pop(t)[0]) for t in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_feature_cache_holds_a_fixed_window_and_reads_evicted_frames_back(random_predictor):
    frames = FrameSource(np.random.default_rng(0).random((20, 24, 24), dtype=np.float32), random_predictor.image_size)
    cache = FeatureCache(random_predictor, frames, random_predictor.device, batch_size=2, max_bytes=1)
    first = [cache.get(i)["backbone_fpn"][0].clone() for i in range(20)]
    assert cache.encoded_frames == 20 and cache.capacity == 4
    assert cache.held_bytes == 4 * cache._frame_bytes and len(cache.spill) == 16
    again = [cache.get(i)["backbone_fpn"][0] for i in reversed(range(20))][::-1]
    assert cache.encoded_frames == 20  # read back from disk, not encoded again
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert cache.embed_all().shape[0] == 20 and cache.encoded_frames == 20
    cache.close()
    assert cache.held_bytes == 0 and len(cache.spill) == 0


def test_feature_cache_without_disk_encodes_evicted_frames_again(random_predictor):
    frames = FrameSource(np.random.default_rng(1).random((10, 24, 24), dtype=np.float32), random_predictor.image_size)
    cache = FeatureCache(random_predictor, frames, random_predictor.device, batch_size=2, max_bytes=1, spill_bytes=0)
    first = cache.get(0)["backbone_fpn"][-1].clone()
    for i in range(1, 10):
        cache.get(i)
    assert torch.allclose(cache.get(0)["backbone_fpn"][-1], first, atol=1e-4)
    assert cache.encoded_frames > 10


def test_propagation_with_everything_offloaded_is_identical(random_predictor, monkeypatch):
    img, truth = phantom(shape_kji=(14, 32, 32))
    arr = np.zeros_like(truth.volume.array)
    arr[[3, 10]] = truth.volume.array[[3, 10]]  # prompts near both ends: every slice waits for the backward pass
    prompt_labels = truth.with_array(arr)

    def run(**kw):
        s = VolumeSession(random_predictor, img, axis=0, **kw)
        out, rep = segment_propagate(s, prompts_from_labels(s, prompt_labels), truth.segments)
        return out, rep, s

    in_memory, rep_a, _ = run(feature_budget_bytes=1 << 30)
    monkeypatch.setattr(propagation, "OffloadedDict", lambda: OffloadedDict(max_bytes=0))
    offloaded, rep_b, s = run(feature_budget_bytes=1)
    assert np.array_equal(in_memory.volume.array, offloaded.volume.array)
    assert [e["objects"] for e in rep_a["slices"]] == [e["objects"] for e in rep_b["slices"]]
    assert s.cache.held_bytes <= s.cache.capacity * s.cache._frame_bytes < 14 * s.cache._frame_bytes
    assert rep_b["timing"]["frames_encoded"] == 14
    assert offloaded.volume.array.dtype == np.uint8


def test_slices_the_backward_pass_cannot_change_are_final_after_the_forward_pass(random_predictor, monkeypatch):
    img, truth = phantom(shape_kji=(12, 32, 32))
    arr = np.zeros_like(truth.volume.array)
    arr[2] = truth.volume.array[2]
    arr[9] = truth.volume.array[9]
    s = VolumeSession(random_predictor, img, axis=0)
    parked = []

    class Watched(OffloadedDict):
        def __setitem__(self, key, value):
            parked.append(key)
            super().__setitem__(key, value)

    monkeypatch.setattr(propagation, "OffloadedDict", Watched)
    _, rep = segment_propagate(s, prompts_from_labels(s, truth.with_array(arr)), truth.segments)
    # slices 3..5 are nearer slice 2 (forward wins), 6..8 nearer slice 9: only those wait; no tie here
    assert parked == [6, 7, 8]
    assert rep["slices"][5]["objects"]["structure_1"]["source"] == "forward from slice 2"
    assert rep["slices"][6]["objects"]["structure_1"]["source"] == "backward from slice 9"
