"""Shared fixtures: the real SAM2 architecture with seeded random weights, phantoms, shared data."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms import SHARED_DATA, TEST_CONFIG, TEST_IMAGE_SIZE  # noqa: E402

# pytest-xdist (run_tests.sh runs two test processes): each worker gets a temp folder of its own, inherited by
# the processes it starts, so the tests that count what is left in the temp folder (job folders, scratch files)
# see only their own process's.
# The cores are shared out too: two processes each computing with every core made each test 2-3x slower than
# alone (the threads wait for each other), so each test process, and the workers it starts, computes with
# its share (the engine's reserved cores, and OpenMP's count for torch before it sets its own).
WORKER_TEMP = None
if os.environ.get("PYTEST_XDIST_WORKER"):
    WORKER_TEMP = os.environ["TMPDIR"] = tempfile.tempdir = tempfile.mkdtemp(
        prefix=f"sam2fewshot-tests-{os.environ['PYTEST_XDIST_WORKER']}-")
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = max(1, _cores // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ.setdefault("SAM2FEWSHOT_RESERVED_CORES", str(_cores - _share))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

# Everything the engine keeps in the user cache (weights, saved support features, indexes, scratch)
# goes to a folder of this test session, for this process and the subprocesses it starts.
# Each test then gets a fresh one of its own (isolated_state below).
TEST_CACHE = os.environ["SAM2FEWSHOT_CACHE"] = tempfile.mkdtemp(prefix="sam2fewshot-test-cache-")
# float32 everywhere, whatever the processor: the default precision is bfloat16 where a CPU computes it
# natively (AMX, AVX512-BF16), and tests of logic, bit-for-bit checks and the equivalence with stock sam2
# must not change with the machine. The tests of the default's choice and of bf16 runs unset or override it.
os.environ["SAM2FEWSHOT_PRECISION"] = "fp32"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_CACHE, ignore_errors=True)
    if WORKER_TEMP is not None:
        shutil.rmtree(WORKER_TEMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_state(monkeypatch, tmp_path_factory):
    """What one test could leave behind for the next: torch's thread count (every model load sets it),
    ITK's global warning switch (the CLI turns it off), and the user cache folder (saved support
    features, indexes, weights), which each test gets empty. Tests pass alone and in any order."""
    import SimpleITK as sitk
    import torch

    threads, itk_warnings = torch.get_num_threads(), sitk.ProcessObject.GetGlobalWarningDisplay()
    monkeypatch.setenv("SAM2FEWSHOT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalWarningDisplay(itk_warnings)



@pytest.fixture(scope="session")
def random_predictor():
    """sam2.1 hiera tiny, random weights seeded with 0, image size 256, on the CPU."""
    from SAM2FewShotLib.sam2.build import build_video_predictor

    return build_video_predictor(TEST_CONFIG, image_size=TEST_IMAGE_SIZE, seed=0, device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def small_predictor():
    """The same architecture at 128 px: for end-to-end runs on real volumes, where only mechanics are checked."""
    from SAM2FewShotLib.sam2.build import build_video_predictor

    return build_video_predictor(TEST_CONFIG, image_size=128, seed=0, device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (it sits beside the repository)")
    return SHARED_DATA
