"""Registration prior, leave-one-out on the MSD hippocampus cases (CPU only, no model weights).

    python benchmarks/registration_loo.py --data ../shared/data/msd_hippocampus --out results.json

Single support: the 20 ordered support -> query pairs. Multi-support: each case is the query and
the 4 others are registered and fused (majority, STAPLE, similarity-weighted). Prints mean 3D Dice
per label (1 anterior, 2 posterior) and overall, and the time per pair (single) or per query
(multi: all 4 registrations and the fusion). The baseline is a plain SimpleITK affine with Mattes
mutual information (geometry-centred, raw intensities, one level), the reference the issue quotes.

Thin stacks (issue 13): ``--thin-mm 8`` first resamples every case to 8 mm slices along
``--thin-axis`` (in-plane spacing kept; each thick slice the mean over its slab, labels nearest
neighbour at the slab centre), so support, query and the Dice reference all live on thin grids.
Its reference is ``baseline_moments``: the same plain affine, initialised by image moments.

    python benchmarks/registration_loo.py --thin-mm 8 --methods baseline_moments affine affine_bspline
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAM2FewShot"))

from SAM2FewShotLib.bench.metrics import dice_per_label
from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.io.volume import LabelMap, Volume, default_segments
from SAM2FewShotLib.registration.fusion import (
    FUSION_METHODS,
    fuse_labels,
    similarity_weights,
)
from SAM2FewShotLib.registration.register import THREADS, TRANSFORMS, register_support

LABELS = (1, 2)
BASELINES = {"baseline": sitk.CenteredTransformInitializerFilter.GEOMETRY,
             "baseline_moments": sitk.CenteredTransformInitializerFilter.MOMENTS}
AXES = {"i": 0, "j": 1, "k": 2}


def load_cases(folder: Path) -> dict[str, tuple[Volume, LabelMap]]:
    cases = {}
    for img in sorted(folder.glob("hippocampus_*_img.nii.gz")):
        case = img.name.split("_")[1]
        image = Volume.from_sitk(sitk.ReadImage(str(img), sitk.sitkFloat32))
        labels = Volume.from_sitk(sitk.ReadImage(str(img).replace("_img", "_label")))
        cases[case] = (image, LabelMap(labels, default_segments(LABELS)))
    if len(cases) < 2:
        raise SystemExit(f"need at least 2 hippocampus cases in {folder}, found {len(cases)}")
    return cases


def thin_stack(image: Volume, labels: LabelMap, thickness_mm: float, axis: int) -> tuple[Volume, LabelMap]:
    """The case as a stack of ``thickness_mm`` slices along ijk ``axis``, centred on the same extent.

    A thick slice averages its slab (linear samples at the fine spacing across it): a scanner's
    slice profile, roughly, so thin structures fade rather than vanish between slices.
    """
    img = image.to_sitk()
    size, spacing = list(img.GetSize()), list(img.GetSpacing())
    count = max(1, int(round(size[axis] * spacing[axis] / thickness_mm)))
    centre = (size[axis] - 1) / 2.0 - (count - 1) / 2.0 * thickness_mm / spacing[axis]
    start = [0.0, 0.0, 0.0]
    start[axis] = centre
    grid = sitk.Image([count if a == axis else n for a, n in enumerate(size)], sitk.sitkFloat32)
    grid.SetSpacing([thickness_mm if a == axis else s for a, s in enumerate(spacing)])
    grid.SetOrigin(img.TransformContinuousIndexToPhysicalPoint(start))
    grid.SetDirection(img.GetDirection())
    step = np.asarray(img.GetDirection()).reshape(3, 3)[:, axis]
    samples = max(1, int(round(thickness_mm / spacing[axis])))
    mean = np.zeros(grid.GetSize()[::-1], np.float64)
    for u in (np.arange(samples) + 0.5) / samples - 0.5:  # offsets across the slab, in slice thicknesses
        shifted = sitk.Image(grid)
        shifted.SetOrigin(tuple(np.asarray(grid.GetOrigin()) + step * u * thickness_mm))
        mean += sitk.GetArrayFromImage(sitk.Resample(img, shifted, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat32, True))
    thin = Volume.from_sitk(grid).with_array((mean / samples).astype(np.float32))
    lab = sitk.Resample(labels.volume.to_sitk(), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        sitk.sitkUInt8)
    return thin, LabelMap(thin.with_array(sitk.GetArrayFromImage(lab)), labels.segments)


def baseline_register(query: Volume, support_image: Volume, support_labels: LabelMap,
                      init=sitk.CenteredTransformInitializerFilter.GEOMETRY) -> LabelMap:
    """Plain SimpleITK affine, Mattes MI, geometry- (or moments-) centred, raw intensities: the reference."""
    fixed = sitk.Cast(query.to_sitk(), sitk.sitkFloat32)
    moving = sitk.Cast(support_image.to_sitk(), sitk.sitkFloat32)
    transform = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3), init)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(THREADS)
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    warped = sitk.Resample(support_labels.volume.to_sitk(), fixed, transform, sitk.sitkNearestNeighbor, 0)
    return LabelMap(query.with_array(sitk.GetArrayFromImage(warped)), support_labels.segments)


def register_all(cases: dict, method: str) -> dict:
    """Every ordered (support, query) pair: warped labels, similarity, seconds."""
    out = {}
    for s, q in itertools.permutations(cases, 2):
        query, (image, labels) = cases[q][0], cases[s]
        start = time.perf_counter()
        try:
            if method in BASELINES:
                warped, similarity = baseline_register(query, image, labels, BASELINES[method]), None
            else:
                reg = register_support(query, image, labels, method)
                warped, similarity = reg.labels, reg.similarity
        except (InputError, RuntimeError) as exc:  # a refusal or an ITK failure scores an empty result
            print(f"  {method:15s} {s} -> {q}: failed: {str(exc).strip().splitlines()[-1]}", flush=True)
            warped, similarity = LabelMap(query.with_array(np.zeros(query.array.shape, np.uint8)), labels.segments), 0.0
        out[s, q] = {"labels": warped, "similarity": similarity, "seconds": time.perf_counter() - start}
        print(f"  {method:15s} {s} -> {q}: {_fmt_dice(_dice(warped, cases[q][1]))}  "
              f"sim {similarity if similarity is None else round(similarity, 3)}  "
              f"{out[s, q]['seconds']:.2f} s", flush=True)
    return out


def fused_results(cases: dict, pairs: dict, fusion: str) -> list[dict]:
    rows = []
    for q in cases:
        supports = [s for s in cases if s != q]
        warped = [pairs[s, q]["labels"] for s in supports]
        start = time.perf_counter()
        weights = similarity_weights([pairs[s, q]["similarity"] for s in supports]) if fusion == "weighted" else None
        fused = fuse_labels(warped, fusion, weights)
        seconds = time.perf_counter() - start + sum(pairs[s, q]["seconds"] for s in supports)
        rows.append({"query": q, "supports": supports, "dice": _dice(fused, cases[q][1]), "seconds": seconds})
    return rows


def summary(name: str, supports: str, fusion: str, rows: list[dict]) -> dict:
    d = np.array([[r["dice"][v] for v in LABELS] for r in rows])
    return {"method": name, "supports": supports, "fusion": fusion, "n": len(rows),
            "dice": {str(v): float(d[:, i].mean()) for i, v in enumerate(LABELS)},
            "dice_mean": float(d.mean()), "dice_min_case": float(d.mean(axis=1).min()),
            "seconds_mean": float(np.mean([r["seconds"] for r in rows]))}


def print_table(rows: list[dict]) -> None:
    head = (f"| {'method':15s} | {'supports':8s} | {'fusion':8s} | {'n':>2s} | "
            "Dice 1 | Dice 2 | mean  | worst | time (s) |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['method']:15s} | {r['supports']:8s} | {r['fusion']:8s} | {r['n']:2d} | {r['dice']['1']:.3f}  "
              f"| {r['dice']['2']:.3f}  | {r['dice_mean']:.3f} | {r['dice_min_case']:.3f} | {r['seconds_mean']:8.2f} |")


def _dice(result: LabelMap, reference: LabelMap) -> dict[int, float]:
    return dice_per_label(result.volume.array, reference.volume.array, LABELS)


def _fmt_dice(d: dict[int, float]) -> str:
    return " ".join(f"{v}:{d[v]:.3f}" for v in LABELS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "msd_hippocampus")
    parser.add_argument("--out", type=Path, default=None, help="write every pair's figures here (JSON)")
    parser.add_argument("--methods", nargs="+", default=None, choices=[*BASELINES, *TRANSFORMS],
                        help="default: baseline and both transforms (baseline_moments with --thin-mm)")
    parser.add_argument("--thin-mm", type=float, default=None,
                        help="resample every case to slices this thick first (thin-stack benchmark)")
    parser.add_argument("--thin-axis", choices=list(AXES), default="k", help="the slice axis of --thin-mm")
    args = parser.parse_args(argv)
    cases = load_cases(args.data)
    if args.thin_mm is not None:
        cases = {c: thin_stack(*cases[c], args.thin_mm, AXES[args.thin_axis]) for c in cases}
        print("thin stacks: " + ", ".join(f"{c} {v.shape_ijk}" for c, (v, _) in cases.items()), flush=True)
    methods = args.methods or ["baseline" if args.thin_mm is None else "baseline_moments", *TRANSFORMS]
    table, details = [], {}
    for method in methods:
        pairs = register_all(cases, method)
        single = [{"support": s, "query": q, "dice": _dice(p["labels"], cases[q][1]), "seconds": p["seconds"],
                   "similarity": p["similarity"]} for (s, q), p in pairs.items()]
        table.append(summary(method, "1", "-", single))
        details[method] = {"single": single}
        fusions = FUSION_METHODS if method not in BASELINES else ("majority", "staple")
        for fusion in fusions:
            rows = fused_results(cases, pairs, fusion)
            table.append(summary(method, str(len(cases) - 1), fusion, rows))
            details[method][fusion] = rows
    print()
    print_table(table)
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": table, "details": _jsonable(details)}, indent=1))
    return 0


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
