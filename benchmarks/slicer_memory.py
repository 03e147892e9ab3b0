"""The Slicer side's memory across Apply / Refine cycles (issue 25, item 3): flat from the second cycle on.

    python benchmarks/slicer_memory.py [--cycles 10] [--slices 300] [--size 256] [--image-size 128] [--json FILE]

Headless, as the panel runs: Slicer's real MRML (the slicer-core wheel), the panel's run control
(slicer/runs.RunController) and the real worker process. A synthetic 300-slice volume with two
structures; each cycle is an Apply (propagate from masks on three slices, the real sam2.1 tiny
architecture with random weights: speed and memory only) and a Refine after the user redraws one
slice. After each cycle this process's resident memory (RSS, psutil) is printed, after a garbage
collection; the worker's is printed beside it. The check: every cycle from the second on is within
10 % of the second's. Exit code 1 when it is not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAM2FewShot"))
MB = 2 ** 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=256, help="slice size of the synthetic volume")
    parser.add_argument("--image-size", type=int, default=128, help="SAM2's input size (random weights)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    import numpy as np
    import psutil
    import slicer

    from SAM2FewShotLib.bench.synthetic import synthetic_case
    from SAM2FewShotLib.io.volume import LabelMap
    from SAM2FewShotLib.run.client import WorkerClient
    from SAM2FewShotLib.slicer.mrml_segments import (
        add_labels_to_segmentation,
        labels_from_segmentation,
        register_segmentation_converters,
        write_segments,
    )
    from SAM2FewShotLib.slicer.mrml_volume import volume_to_node
    from SAM2FewShotLib.slicer.panel import PanelChoices
    from SAM2FewShotLib.slicer.runs import RunController

    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    volume, truth = synthetic_case(args.slices, args.size, 2, seed=0)
    query = volume_to_node(volume, scene, "query")
    prompted = [args.slices // 4, args.slices // 2, 3 * args.slices // 4]
    masks = np.zeros_like(truth.volume.array)
    masks[prompted] = truth.volume.array[prompted]
    prompts = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prompts")
    ids = add_labels_to_segmentation(prompts, LabelMap(truth.volume.with_array(masks), truth.segments), query)
    del masks

    finished: list[tuple[bool, str]] = []
    controller = RunController(scene, lambda: WorkerClient(python=sys.executable, pythonpath=[ROOT / "SAM2FewShot"]),
                               on_finished=lambda ok, message: finished.append((ok, message)))
    choices = PanelChoices(method="propagate", device="cpu", random_weights=True, image_size=args.image_size,
                           precision="fp32")

    def wait() -> None:
        while controller.poll():
            time.sleep(0.05)
        ok, message = finished[-1]
        if not ok:
            raise SystemExit(f"the run failed: {message}")

    def redraw(index: int) -> None:  # the user redraws one slice of the first structure, as the Segment Editor does
        output, segment_ids = controller.output_node(), controller.last.segment_ids
        edited = labels_from_segmentation(output, volume, segment_ids)
        array = edited.volume.array.copy()
        array[index][array[index] == 1] = 0
        array[index, 10:40, 10:40][array[index, 10:40, 10:40] == 0] = 1
        write_segments(output, LabelMap(edited.volume.with_array(array), edited.segments),
                       dict(enumerate(segment_ids, start=1)))

    me = psutil.Process()
    rows = []
    print(f"{args.cycles} Apply/Refine cycles, {args.slices} slices of {args.size} px, SAM2 input "
          f"{args.image_size} px; query {volume.array.nbytes / MB:.0f} MB in memory ({volume.array.dtype})")
    print("cycle  slicer_side_rss_mb  worker_rss_mb  seconds")
    try:
        for cycle in range(1, args.cycles + 1):
            start = time.perf_counter()
            controller.start_run(choices, query, prompts, ids)
            wait()
            redraw(prompted[1] + 5 + cycle % 7)
            controller.start_refine(choices)
            wait()
            gc.collect()
            worker = psutil.Process(controller.client.pid).memory_info().rss if controller.client.pid else 0
            rows.append({"cycle": cycle, "slicer_side_rss_mb": round(me.memory_info().rss / MB, 1),
                         "worker_rss_mb": round(worker / MB, 1), "seconds": round(time.perf_counter() - start, 1)})
            print(f"{cycle:5d}  {rows[-1]['slicer_side_rss_mb']:18.1f}  {rows[-1]['worker_rss_mb']:13.1f}  "
                  f"{rows[-1]['seconds']:7.1f}", flush=True)
    finally:
        controller.shutdown()
    base = rows[1]["slicer_side_rss_mb"] if len(rows) > 1 else rows[0]["slicer_side_rss_mb"]
    spread = max(abs(r["slicer_side_rss_mb"] - base) / base for r in rows[1:]) if len(rows) > 1 else 0.0
    flat = spread <= 0.10
    print(f"from the second cycle on: within {100 * spread:.1f} % of cycle 2 ({base:.1f} MB): "
          f"{'flat (<= 10 %)' if flat else 'NOT flat (> 10 %)'}")
    print(f"cpu: {_cpu()}; pid {os.getpid()}")
    if args.json:
        args.json.write_text(json.dumps({"cycles": rows, "spread_from_cycle_2": spread, "flat": flat,
                                         "slices": args.slices, "size": args.size, "image_size": args.image_size},
                                        indent=2) + "\n", encoding="utf-8")
    return 0 if flat else 1


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
