"""Large CT: peak memory on the whole path from file to written result, and time per slice.

    python benchmarks/large_ct_memory.py [--slices 1000] [--size 512] [--image-sizes 256,1024] \\
        [--timed-slices 3] [--threads N] [--work DIR] [--out FILE.json]

Writes a synthetic int16 CT (a body of soft tissue with organs, 0.6 mm slices, uncompressed NRRD) and
a box prompt on its middle slice, then, in a fresh process per image size, loads the random-weight
sam2.1 tiny model and measures the Runner's propagate run on it (read, checks, normalised frames of
every slice, the encoder and propagation over --timed-slices slices around the prompt, the full-size
label map) plus writing the result file. Peak RSS is the kernel's high-water mark (VmHWM, reset at
the start); "above the volume" subtracts the volume's own bytes from the peak above the loaded
model, which is the figure issue 13 sets a target for (under ~1 GB at 1024 px for 1000 slices).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SAM2FewShot"))

MB = 1024.0 * 1024.0


def write_ct(path: Path, slices: int, size: int) -> tuple[int, ...]:
    """An int16 CT in HU: air, an elliptic body of fat and soft tissue, a liver-like and a kidney-like
    organ, noise; written a slab at a time would not help (SimpleITK writes one buffer), so the parent
    process holds it once, and the measured children never see it."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    body = (xx / 0.42) ** 2 + (yy / 0.32) ** 2 <= 1.0
    liver = ((xx + 0.12) / 0.16) ** 2 + ((yy + 0.02) / 0.12) ** 2 <= 1.0
    kidney = ((xx - 0.18) / 0.05) ** 2 + ((yy - 0.1) / 0.07) ** 2 <= 1.0
    ct = np.full((slices, size, size), -1000, dtype=np.int16)
    for k in range(slices):
        section = np.where(body, 40, -1000).astype(np.int16)
        if 0.2 < k / slices < 0.8:
            section[liver] = 60
            section[kidney] = 30
        section += rng.normal(0.0, 12.0, (size, size)).astype(np.int16)
        ct[k] = section
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((0.7, 0.7, 0.6))
    image.SetOrigin((-180.0, -180.0, -300.0))
    sitk.WriteImage(image, str(path), useCompression=False)
    return ct.shape


def write_prompt(path: Path, slices: int, size: int) -> None:
    mid = slices // 2
    lo, hi = int(size * 0.2), int(size * 0.55)
    path.write_text(json.dumps({"prompts": [{"label": 1, "box_ijk": [[lo, lo, mid], [hi, hi, mid]]}]}))


def header_size(path: str) -> tuple[int, ...]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetSize()


def measure(query: str, prompts: str, image_size: int, timed: int, threads: int | None, work: str) -> dict:
    """In a fresh process: the model loaded first, then the run and the write measured together."""
    import gc

    from SAM2FewShotLib.bench.ram import PeakMemory, release_free_memory
    from SAM2FewShotLib.run.outputs import write_outputs
    from SAM2FewShotLib.run.request import FrameOptions, Request
    from SAM2FewShotLib.run.runner import Runner
    from SAM2FewShotLib.sam2.build import ModelOptions

    model = ModelOptions(random_weights=True, image_size=image_size, device="cpu", threads=threads)
    runner = Runner(save_support_features=False)
    runner.model(model)
    shape = header_size(query)  # (i, j, k)
    slices = int(shape[2])
    mid = slices // 2
    first, last = mid - timed // 2, mid - timed // 2 + timed - 1
    out, report_path = Path(work) / f"result_{image_size}.nii.gz", Path(work) / f"result_{image_size}.json"
    request = Request(method="propagate", query=query, prompts=prompts, model=model,
                      frames=FrameOptions(axis="axial", slice_range=(first, last)))
    gc.collect()
    release_free_memory()
    start = time.perf_counter()
    with PeakMemory() as mem:
        labels, report = runner.run(request)
        run_s = time.perf_counter() - start
        write_outputs(labels, report, out, report_path)
    total_s = time.perf_counter() - start
    volume_bytes = int(shape[0] * shape[1] * shape[2] * 2)
    above = mem.above_start_bytes
    return {
        "volume": "x".join(str(int(s)) for s in shape), "volume_mb": round(volume_bytes / MB, 1),
        "image_size": image_size, "threads": report["model"]["threads"], "timed_slices": timed,
        "run_s": round(run_s, 1), "run_and_write_s": round(total_s, 1),
        "per_slice_s": report["timing"]["per_slice_s"],
        "peak_rss_mb": round(mem.peak_bytes / MB, 1), "model_loaded_rss_mb": round(mem.start_bytes / MB, 1),
        "peak_above_model_mb": round(above / MB, 1),
        "peak_above_volume_mb": round((above - volume_bytes) / MB, 1), "rss_method": mem.method,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-sizes", default="256,1024")
    parser.add_argument("--timed-slices", type=int, default=3, help="slices propagated (and timed) around the prompt")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sam2fewshot_large_ct"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.timed_slices < 1 or args.slices < args.timed_slices:
        parser.error("--timed-slices must be at least 1 and at most --slices")

    args.work.mkdir(parents=True, exist_ok=True)
    query, prompts = args.work / f"ct_{args.slices}x{args.size}.nrrd", args.work / "prompts.json"
    if not query.exists():
        print(f"writing {query} ...", file=sys.stderr)
        write_ct(query, args.slices, args.size)
    write_prompt(prompts, args.slices, args.size)
    rows = []
    for image_size in (int(s) for s in args.image_sizes.split(",")):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            row = pool.submit(measure, str(query), str(prompts), image_size, args.timed_slices, args.threads,
                              str(args.work)).result()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print("| volume | image size | threads | s/slice (timed slices) | run + write | peak RSS | above model | "
          "above model and volume |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} int16 ({r['volume_mb']:.0f} MB) | {r['image_size']} | {r['threads']} | "
              f"{r['per_slice_s']:.2f} ({r['timed_slices']}) | {r['run_and_write_s']:.1f} s | "
              f"{r['peak_rss_mb']:.0f} MB | "
              f"{r['peak_above_model_mb']:.0f} MB | {r['peak_above_volume_mb']:.0f} MB |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
