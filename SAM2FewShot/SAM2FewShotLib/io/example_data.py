"""Example data: the Medical Segmentation Decathlon hippocampus task, downloaded once and cached.

Offline machines point ``--data`` at a folder that already holds the cases, either in the MSD layout
(imagesTr/, labelsTr/) or as hippocampus_NNN_img.nii.gz + hippocampus_NNN_label.nii.gz pairs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from ..common.digests import file_digest
from ..common.errors import InputError

# The MONAI project's public mirror of the MSD archive, and the MD5 MONAI publishes for it.
MSD_HIPPOCAMPUS_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar"
MSD_HIPPOCAMPUS_MD5 = "9d24dba78a72977dbd1d2e110310f31b"

# The demo's pair (the README names it): a query and its labelled support, both in the MSD training set.
DEMO_QUERY, DEMO_SUPPORT = "hippocampus_015", "hippocampus_184"
# The structures as the task's dataset.json names them ("1": "Anterior", "2": "Posterior").
MSD_HIPPOCAMPUS_NAMES = {1: "anterior hippocampus", 2: "posterior hippocampus"}
DATASET_JSON = "dataset.json"

Case = tuple[Path, Path]  # (image, labels)
log = logging.getLogger(__name__)


def find_cases(folder: Path) -> dict[str, Case]:
    """Labelled cases in a folder: MSD layout or *_img / *_label pairs (sorted by name)."""
    folder = Path(folder)
    cases: dict[str, Case] = {}
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        for img in sorted((folder / "imagesTr").glob("*.nii.gz")):
            lab = folder / "labelsTr" / img.name
            if not img.name.startswith("._") and lab.exists():
                cases[img.name[: -len(".nii.gz")]] = (img, lab)
    for img in sorted(folder.glob("*_img.nii.gz")):
        lab = img.with_name(img.name.replace("_img.nii.gz", "_label.nii.gz"))
        if lab.exists():
            cases[img.name[: -len("_img.nii.gz")]] = (img, lab)
    return cases


def example_cases(data: Path | None = None) -> dict[str, Case]:
    """The hippocampus cases: from ``data`` when given, else from the cache (downloading once)."""
    if data is not None:
        cases = find_cases(Path(data))
        if not cases:
            raise InputError(f"no labelled cases found in {data} (expected imagesTr/labelsTr or *_img/*_label pairs)")
        return cases
    root = _cache_root()
    target = root / "Task04_Hippocampus"
    if not find_cases(target):
        _download_and_unpack(root)
    return find_cases(target)


def structure_names(data: Path | None = None) -> dict[int, str]:
    """Label value -> structure name: from the folder's MSD dataset.json when it has one, else the task's."""
    folder = Path(data) if data is not None else _cache_root() / "Task04_Hippocampus"
    try:
        labels = json.loads((folder / DATASET_JSON).read_text(encoding="utf-8"))["labels"]
        names = {int(v): f"{name.lower()} hippocampus" for v, name in labels.items() if int(v) > 0}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return dict(MSD_HIPPOCAMPUS_NAMES)
    return names or dict(MSD_HIPPOCAMPUS_NAMES)


def _cache_root() -> Path:
    from ..common.cache import cache_dir

    return cache_dir() / "data"


def _download_and_unpack(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tar", dir=root)
    os.close(fd)
    try:
        log.warning("downloading the MSD hippocampus example data (about 28 MB) from %s", MSD_HIPPOCAMPUS_URL)
        try:
            urllib.request.urlretrieve(MSD_HIPPOCAMPUS_URL, tmp)
        except OSError as exc:
            raise InputError(f"cannot download the example data from {MSD_HIPPOCAMPUS_URL} ({exc})") from None
        digest = file_digest(tmp, "md5")
        if digest != MSD_HIPPOCAMPUS_MD5:
            raise InputError(f"example data checksum mismatch (md5 {digest}, expected {MSD_HIPPOCAMPUS_MD5})")
        with tarfile.open(tmp) as tar:
            members = [m for m in tar.getmembers()
                       if (re.search(r"(imagesTr|labelsTr)/hippocampus_\d+\.nii\.gz$", m.name)
                           or m.name.endswith(f"Task04_Hippocampus/{DATASET_JSON}"))
                       and not Path(m.name).name.startswith("._")]
            tar.extractall(root, members=members, filter="data")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
