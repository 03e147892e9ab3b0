"""Cohort throughput: one `sam2fewshot segment` call per case against `sam2fewshot batch` on one machine and
on a local Ray cluster, on the same cases, in one run, each with a fresh user cache.

    python benchmarks/cohort_throughput.py --data ../shared/data/msd_hippocampus --out bench_out/cohort \\
        [--image-size 256] [--workers 2] [--weights random|cached] [--rows single,saved,batch,ray]

Prints cases per hour for: segment per case without saved support features (how it was), segment per
case with them (later calls read the supports' features back), batch (one warm model, supports
encoded once, the next query read ahead), and batch on Ray with --workers CPU actors; and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUPPORT = "hippocampus_184"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of *_img/*_label hippocampus cases")
    parser.add_argument("--out", type=Path, required=True, help="scratch folder for the runs (replaced)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="Ray CPU actors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", choices=["random", "cached"], default="random",
                        help="random: the architecture with random weights (speed only); cached: the real ones")
    parser.add_argument("--support", default=SUPPORT, help="the support case's name (NAME_img/NAME_label)")
    parser.add_argument("--rows", default="single,saved,batch,ray",
                        help="which runs, comma-separated: single (segment per case, nothing saved), saved "
                             "(segment per case, supports saved), batch (one machine), ray (batch on Ray); "
                             "ratios are over the first")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - {"single", "saved", "batch", "ray"}
    if unknown or not rows:
        parser.error(f"--rows takes single, saved, batch and ray, not {', '.join(sorted(unknown)) or 'nothing'}")
    if args.out.exists():
        shutil.rmtree(args.out)
    queries = args.out / "queries"
    queries.mkdir(parents=True)
    for image in sorted(args.data.glob("*_img.nii.gz")):
        if not image.name.startswith(args.support):
            (queries / image.name).symlink_to(image.resolve())
    cases = sorted(queries.iterdir())
    support = [str(args.data / f"{args.support}_img.nii.gz"), str(args.data / f"{args.support}_label.nii.gz")]
    model = ["--image-size", str(args.image_size), "--device", args.device, "-q"]
    model += ["--random-weights"] if args.weights == "random" else []
    cli = [sys.executable, "-m", "SAM2FewShotLib.cli"]
    results = {}

    def timed(name: str, commands: list[list[str]], **env) -> None:
        cache = args.out / f"cache_{name}"
        environment = {**os.environ, "SAM2FEWSHOT_CACHE": str(cache), **env}
        if args.weights == "cached" and "SAM2FEWSHOT_CACHE" in os.environ:
            environment["SAM2FEWSHOT_CACHE"] = os.environ["SAM2FEWSHOT_CACHE"]  # the real weights live there
        start = time.perf_counter()
        for command in commands:
            subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        results[name] = {"seconds": round(seconds, 1), "cases_per_hour": round(3600 * len(cases) / seconds, 1)}
        print(f"{name:<36} {seconds:7.1f} s  {results[name]['cases_per_hour']:8.1f} cases/hour", flush=True)

    print(f"{len(cases)} queries, support {args.support}, {args.weights} weights, {args.image_size} px, {args.device}")
    per_case = [[*cli, "segment", "--query", str(c), "--support", *support, "--out",
                 str(args.out / "single" / c.name.replace("_img", "")), *model] for c in cases]
    (args.out / "single").mkdir()
    batch = [*cli, "batch", "--queries", str(queries), "--support", *support, *model]
    for row in rows:
        if row == "single":
            timed("segment per case (nothing saved)", per_case, SAM2FEWSHOT_SUPPORT_FEATURES_GB="0")
        elif row == "saved":
            timed("segment per case (supports saved)", per_case)
        elif row == "batch":
            timed("batch, one machine", [[*batch, "--out", str(args.out / "local")]])
        else:
            timed(f"batch, Ray, {args.workers} CPU actors", [[*batch, "--out", str(args.out / "ray"), "--ray",
                                                             "--workers", str(args.workers)]])
    base = results[next(iter(results))]["seconds"]
    for r in results.values():
        r["speedup_over_first_row"] = round(base / r["seconds"], 2)
    print(json.dumps(results, indent=1))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
