"""The CUDA path: bfloat16 autocast, offloading GPU -> disk -> GPU, the worker on cuda, and the
equivalence with stock sam2 on the GPU. Skipped where there is no CUDA GPU; benchmarks/gpu_check.sh
runs them (with -m cuda) where there is one.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from phantoms import write_prompted_query
from SAM2FewShotLib.io.volume_io import read_labels

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (this PyTorch sees none); benchmarks/gpu_check.sh runs it on one"),
]
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


@pytest.fixture(scope="module")
def cuda_predictor():
    from SAM2FewShotLib.sam2.build import build_video_predictor

    return build_video_predictor(CONFIG, image_size=256, seed=0, device="cuda")


def _frames_and_prompts(n: int = 16):
    from SAM2FewShotLib.sam2.conditioning import Prompt
    from SAM2FewShotLib.sam2.frames import FrameSource

    yy, xx = np.mgrid[:48, :48]
    vol = np.stack([0.2 + 0.6 * (((yy - 20) ** 2 + (xx - 18 - t // 3) ** 2) < 64) for t in range(n)]).astype(np.float32)
    disc = ((yy - 20) ** 2 + (xx - 18) ** 2) < 64
    return FrameSource(vol, 256), [Prompt(1, 1, mask=disc), Prompt(n - 3, 2, box=[30, 30, 44, 44])], disc


def test_propagation_runs_under_bfloat16_autocast_with_bfloat16_memories(cuda_predictor):
    from SAM2FewShotLib.sam2.propagation import propagate

    frames, prompts, disc = _frames_and_prompts()
    dtypes = []
    original = type(cuda_predictor)._run_memory_encoder

    def spy(self, *args, **kwargs):
        features, pos = original(self, *args, **kwargs)
        dtypes.append(features.dtype)
        return features, pos

    type(cuda_predictor)._run_memory_encoder = spy
    try:
        logits = {}
        result = propagate(cuda_predictor, frames, prompts, on_logits=logits.__setitem__)
    finally:
        type(cuda_predictor)._run_memory_encoder = original
    assert dtypes and set(dtypes) == {torch.bfloat16}  # stock sam2's storage on CUDA
    assert result.visited.any(axis=1).all() and sorted(logits) == list(range(len(frames)))
    assert all(torch.isfinite(v).all() for v in logits.values())
    assert np.array_equal(result.labels[1] == 1, disc)  # a drawn mask comes back as drawn


def test_features_offloaded_from_the_gpu_come_back_bit_identical(cuda_predictor):
    from SAM2FewShotLib.sam2.feature_cache import FeatureCache
    from SAM2FewShotLib.sam2.frames import FrameSource

    frames = FrameSource(np.random.default_rng(0).random((20, 24, 24), dtype=np.float32), 256)
    cache = FeatureCache(cuda_predictor, frames, cuda_predictor.device, batch_size=2, max_bytes=1)
    first = [cache.get(i)["backbone_fpn"][0].clone() for i in range(20)]
    assert first[0].device.type == "cuda" and len(cache.spill) == 16
    again = [cache.get(i)["backbone_fpn"][0] for i in reversed(range(20))][::-1]
    assert cache.encoded_frames == 20  # read back from disk, not encoded again
    assert all(b.device.type == "cuda" and torch.equal(a, b) for a, b in zip(first, again, strict=True))
    cache.close()


def test_stock_equivalence_on_the_gpu(cuda_predictor):
    from SAM2FewShotLib.bench.equivalence import CUDA_TOLERANCE, checked_against_stock
    from SAM2FewShotLib.sam2.propagation import propagate

    frames, prompts, _ = _frames_and_prompts()
    with checked_against_stock() as found:
        propagate(cuda_predictor, frames, prompts)
    comparison = found[0]
    print(f"\nCUDA bfloat16 equivalence with stock sam2: max |logit diff| {comparison.max_abs_diff:.3g}, "
          f"Dice {comparison.dice:.4f} on {torch.cuda.get_device_name()}")
    assert comparison.tolerance == CUDA_TOLERANCE and comparison.equal, comparison.as_json()


def test_the_worker_runs_a_job_on_cuda(tmp_path):
    from SAM2FewShotLib.run.client import JobFolder, WorkerClient, read_result

    _, prompt_file = write_prompted_query(tmp_path, (8, 32, 32), "prompt.nrrd")
    prompt = read_labels(prompt_file).volume.array  # the truth on slice 4 only
    client = WorkerClient(env=dict(os.environ))
    try:
        with JobFolder() as folder:
            job_id = client.submit({"method": "propagate", "query": str(tmp_path / "query.nrrd"),
                                    "prompt_labels": str(tmp_path / "prompt.nrrd"), "out": str(folder.labels),
                                    "report": str(folder.report),
                                    "model": {"random_weights": True, "image_size": 256, "device": "cuda"}})
            deadline, result = time.monotonic() + 300, None
            while result is None and time.monotonic() < deadline:
                result = next((e for e in client.poll() if e.get("id") == job_id and e["event"] in ("result", "error")),
                              None)
                time.sleep(0.01)
            assert result is not None and result["event"] == "result", result
            labels, report = read_result(result)
            assert report["model"]["device"].startswith("cuda")
            assert np.array_equal(labels.volume.array[4], prompt[4])
    finally:
        client.shutdown(timeout=5.0)
    assert read_labels(tmp_path / "prompt.nrrd").volume.array.any()  # inputs untouched
