"""Issue 25, item 4: the registration method runs in a 3D Slicer where nothing was installed.

The walk (Testing/bare_slicer/bare_walk.py) runs in a Python that can import only what Slicer 5.10 ships
(Testing/bare_slicer/sitecustomize.py: no torch, sam2, psutil, pynrrd, slicerio, huggingface_hub, tqdm...),
with Slicer's real MRML (slicer-core) and the real worker started as the panel starts it: Apply, Apply
again, Undo twice, Cancel (the worker's tree stopped without psutil), and a quiet registration cohort
through the CLI (the review section's input).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from phantoms import REPO

pytest.importorskip("slicer", reason="Slicer's MRML is not importable (pip install slicer-core)")

BARE = REPO / "Testing" / "bare_slicer"


def bare_environment() -> dict:
    path = os.pathsep.join(str(p) for p in (BARE, REPO / "SAM2FewShot", REPO / "Testing"))
    return {**os.environ, "PYTHONPATH": path, "SAM2FEWSHOT_BARE_SLICER": "1", "OMP_NUM_THREADS": "1"}


def test_the_guard_refuses_what_a_fresh_slicer_does_not_ship():
    code = "import numpy, SimpleITK, vtk, slicer, SAM2FewShotLib.slicer.runs\nimport psutil"
    done = subprocess.run([sys.executable, "-c", code], env=bare_environment(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "No module named 'psutil' (a fresh 3D Slicer 5.10 does not ship it)" in done.stderr


def test_registration_apply_again_undo_and_cancel_need_nothing_slicer_does_not_ship(tmp_path):
    done = subprocess.run([sys.executable, str(BARE / "bare_walk.py"), str(tmp_path)], env=bare_environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("apply: Done") and "added structure_1, structure_2" in lines[0]
    assert "replaced structure_1, structure_2" in lines[1]
    assert lines[-1] == "bare Slicer registration walk passed"
    assert "cancel: the worker is gone" in lines
