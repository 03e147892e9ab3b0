"""Retrieval benchmarks: top-k latency over a large synthetic index, and index builds on real cases.

    python benchmarks/retrieval_latency.py latency [--embeddings 100000] [--dim 256] [--k 3]
        Builds a synthetic library index through the real sync path (dummy case files, random unit
        vectors as each case's embeddings), loads it, and times cosine top-k per query slice, one
        slice at a time and in a volume-sized batch. No model is involved.

    python benchmarks/retrieval_latency.py build [--features sam2|dinov2-small] [--data DIR]
        Builds the index of the MSD hippocampus cases (a library.json in a temporary folder lists
        them, so nothing is written beside the shared data) with random weights, and prints the
        time, the embeddings and the size on disk; a second build shows the no-change cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAM2FewShot"))

from SAM2FewShotLib.library.cases import ROW_DTYPE, library_from_pairs
from SAM2FewShotLib.library.index import CaseEmbeddings, EmbeddingIndex, IndexConfig

DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus"


def synthetic_embedder(dim: int, per_case: int, seed: int):
    """Each 'case' yields ``per_case`` random unit vectors, one structure (label 1) on every slice."""
    def embed(case) -> CaseEmbeddings:
        rng = np.random.default_rng([seed, int(case.id.split("_")[1])])
        vectors = rng.standard_normal((per_case, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = np.zeros(per_case, ROW_DTYPE)
        rows["emb"] = rows["slice"] = np.arange(per_case)
        rows["value"] = 1
        rows["position"] = rows["extent_position"] = np.linspace(0, 1, per_case)
        rows["area"] = 100
        return CaseEmbeddings(vectors, rows, [{"value": 1, "name": "organ", "color": [1, 0, 0]}], per_case)

    return embed


def run_latency(args: argparse.Namespace) -> None:
    per_case = args.slices_per_case
    n_cases = -(-args.embeddings // per_case)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = []
        for c in range(n_cases):  # tiny stand-in files: the index hashes them like real cases
            for kind in ("img", "label"):
                (root / f"case_{c:05d}_{kind}.nii.gz").write_bytes(f"{kind} {c}".encode())
            pairs.append((root / f"case_{c:05d}_img.nii.gz", root / f"case_{c:05d}_label.nii.gz"))
        library = library_from_pairs(pairs, root)
        index = EmbeddingIndex(library.index_root(), IndexConfig(f"synthetic-{args.dim}", "axial", {"mode": "auto"}))
        t0 = time.perf_counter()
        data, stats = index.sync(library.cases, synthetic_embedder(args.dim, per_case, args.seed))
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        data, stats2 = index.sync(library.cases, synthetic_embedder(args.dim, per_case, args.seed))
        resync_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.load()
        load_s = time.perf_counter() - t0
        size_mb = index.size_bytes() / 1e6
        rng = np.random.default_rng(args.seed + 1)
        queries = torch.from_numpy(rng.standard_normal((args.batch, args.dim)).astype(np.float32))
        positions = np.linspace(0, 1, args.batch, dtype=np.float32)
        single = _time(lambda i: data.search(queries[i % args.batch : i % args.batch + 1], args.k), args.repeats)
        batched = _time(lambda i: data.search(queries, args.k), args.repeats)
        windowed = _time(lambda i: data.search(queries, args.k, query_positions=positions, window=0.1), args.repeats)
    print(json.dumps({
        "embeddings": len(data), "dim": args.dim, "cases": n_cases, "k": args.k,
        "torch_threads": torch.get_num_threads(),
        "build_s": round(build_s, 2), "resync_no_change_s": round(resync_s, 2), "load_s": round(load_s, 2),
        "index_mb": round(size_mb, 1), "resync_embedded": stats2.embedded,
        "per_slice_ms": {
            "one_slice_per_query": round(single * 1e3, 2),
            f"batch_of_{args.batch}": round(batched / args.batch * 1e3, 3),
            f"batch_of_{args.batch}_window_0.1": round(windowed / args.batch * 1e3, 3),
        },
    }, indent=1))


def _time(fn, repeats: int) -> float:
    fn(0)  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_build(args: argparse.Namespace) -> None:
    from SAM2FewShotLib.cli.main import main

    cases = sorted(Path(args.data).glob("*_label.nii.gz"))
    if not cases:
        raise SystemExit(f"no *_label.nii.gz in {args.data}")
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "library.json"
        listing.write_text(json.dumps({"cases": [{"image": str(c).replace("_label", "_img"), "labels": str(c)}
                                                 for c in cases]}))
        argv = ["library", "build", tmp, "--features", args.features, "--random-weights", "--image-size",
                str(args.image_size), "-q"]
        for attempt in ("first build", "no-change rebuild"):
            t0, c0 = time.perf_counter(), time.process_time()
            code = main(argv)
            print(f"{attempt}: exit {code}, {time.perf_counter() - t0:.1f} s wall, "
                  f"{time.process_time() - c0:.1f} s CPU "
                  f"(model build included; torch threads {torch.get_num_threads()})")
        files = [p for p in (Path(tmp) / ".sam2fewshot_index").rglob("*") if p.is_file()]
        print(f"index: {len(files)} files, {sum(p.stat().st_size for p in files)} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    lat = sub.add_parser("latency", help="top-k latency over a synthetic index")
    lat.add_argument("--embeddings", type=int, default=100_000)
    lat.add_argument("--dim", type=int, default=256, help="256: SAM2 pooled features; 384/768/1024: DINOv2 s/b/l")
    lat.add_argument("--slices-per-case", type=int, default=200)
    lat.add_argument("--k", type=int, default=3)
    lat.add_argument("--batch", type=int, default=64, help="query slices per search call (a volume's worth)")
    lat.add_argument("--repeats", type=int, default=20)
    lat.add_argument("--threads", type=int, help="torch threads (default torch's own)")
    lat.add_argument("--seed", type=int, default=0)
    build = sub.add_parser("build", help="index build time and size for the MSD hippocampus cases")
    build.add_argument("--features", default="sam2")
    build.add_argument("--image-size", type=int, default=256, help="SAM2 input size (default 256)")
    build.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    run_latency(args) if args.mode == "latency" else run_build(args)


if __name__ == "__main__":
    main()
