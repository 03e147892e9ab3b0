"""Synthetic volumes with known geometry and known objects, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from SAM2FewShotLib.io.volume import LabelMap, Segment, Volume

REPO = Path(__file__).resolve().parents[1]  # the repository root, wherever a test file sits below Testing/
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_IMAGE_SIZE = 256  # the real sam2.1 tiny architecture, at a reduced input size for CPU speed
TEST_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


OBLIQUE = rotation("z", 20) @ rotation("x", 15)
RAS_FLIP = np.diag([-1.0, -1.0, 1.0])  # a RAS-stored volume seen in LPS


def phantom(
    shape_kji: tuple[int, int, int] = (12, 40, 48),
    spacing: tuple[float, float, float] = (0.8, 0.9, 2.5),
    origin: tuple[float, float, float] = (-20.0, 31.5, 7.25),
    direction: np.ndarray | None = None,
    n_objects: int = 2,
    seed: int = 0,
) -> tuple[Volume, LabelMap]:
    """An MR-like image with ``n_objects`` bright ellipsoids and the label map that covers them."""
    direction = np.eye(3) if direction is None else direction
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in shape_kji], indexing="ij")
    img = 100.0 + 10.0 * rng.standard_normal(shape_kji)
    labels = np.zeros(shape_kji, dtype=np.uint8)
    nk, nj, ni = shape_kji
    segments = []
    for n in range(n_objects):
        ck, cj, ci = nk / 2, nj * (0.3 + 0.4 * n / max(1, n_objects - 1)), ni * (0.35 + 0.3 * (n % 2))
        rk, rj, ri = nk * 0.35, nj * 0.14, ni * 0.13
        inside = ((k - ck) / rk) ** 2 + ((j - cj) / rj) ** 2 + ((i - ci) / ri) ** 2 <= 1.0
        labels[inside & (labels == 0)] = n + 1
        img[inside] += 300.0 + 80.0 * n
        segments.append(Segment(n + 1, f"structure_{n + 1}", (0.2 + 0.3 * n, 0.8 - 0.2 * n, 0.4)))
    geo = dict(spacing=spacing, origin=origin, direction=tuple(np.asarray(direction).ravel()))
    image = Volume(img.astype(np.float32), **geo)
    return image, LabelMap(Volume(labels, **geo), tuple(segments))


def write_query_and_support(root: Path, query: str, image: str, labels: str) -> tuple[Path, Path, Path]:
    """A small phantom query and a labelled phantom support case (8x32x32, 3 mm slices) written in ``root``
    under the names given: the inputs of the tests that run the real CLI or worker on files."""
    from SAM2FewShotLib.io.volume_io import write_labels, write_volume

    query_image, _ = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0))
    support, support_labels = phantom((8, 32, 32), spacing=(1.0, 1.0, 3.0), seed=1)
    write_volume(query_image, root / query)
    write_volume(support, root / image)
    write_labels(support_labels, root / labels)
    return root / query, root / image, root / labels


def write_prompted_query(root: Path, shape: tuple[int, int, int], prompt_name: str) -> tuple[Path, Path]:
    """A phantom query (3 mm slices) and its truth on the middle slice only, as the prompt labels of a
    propagation: ``root``/query.nrrd and ``root``/``prompt_name``."""
    from SAM2FewShotLib.io.volume_io import write_labels, write_volume

    image, truth = phantom(shape, spacing=(1.0, 1.0, 3.0))
    prompt = np.zeros_like(truth.volume.array)
    prompt[shape[0] // 2] = truth.volume.array[shape[0] // 2]
    write_volume(image, root / "query.nrrd")
    write_labels(LabelMap(truth.volume.with_array(prompt), truth.segments), root / prompt_name)
    return root / "query.nrrd", root / prompt_name
