"""Warm re-propagation: the user fixes one slice and propagates again, on a volume already encoded.

    python benchmarks/warm_repropagation.py [--slices 200] [--size 512] [--image-size 1024] \\
        [--structures 3] [--range 20] [--device auto] [--out FILE.json]

Builds the real sam2.1 tiny architecture with random weights (speed only), encodes a synthetic volume
once by propagating masks from its middle slice (the cold run), then times a propagation of --range
slices around an edited slice on the same session, as the Slicer worker does after an edit: no slice
is encoded again. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SAM2FewShot"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="slice size of the synthetic volume")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--structures", type=int, default=3)
    parser.add_argument("--range", type=int, default=20, help="slices propagated again after the edit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from SAM2FewShotLib.bench.synthetic import slice_masks, synthetic_case
    from SAM2FewShotLib.common.context import RunContext
    from SAM2FewShotLib.methods.propagate import segment_propagate
    from SAM2FewShotLib.sam2.build import build_video_predictor
    from SAM2FewShotLib.sam2.conditioning import Prompt
    from SAM2FewShotLib.sam2.devices import resolve_device
    from SAM2FewShotLib.sam2.session import VolumeSession

    device = resolve_device(args.device)
    predictor = build_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", image_size=args.image_size, seed=0,
                                      device=device)
    volume, truth = synthetic_case(args.slices, args.size, args.structures, seed=0)
    mid = args.slices // 2

    def prompts(index: int) -> list[Prompt]:
        return [Prompt(frame=index, obj_id=v, mask=m) for v, m in slice_masks(truth, index).items()]

    def timed(run) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    session = VolumeSession(predictor, volume, axis=0)
    cold = timed(lambda: segment_propagate(session, prompts(mid), truth.segments))
    encoded = session.cache.encoded_frames
    edited = mid + args.range // 2  # the fixed slice, re-propagated over its neighbourhood
    lo, hi = max(0, edited - args.range // 2), min(args.slices - 1, edited - args.range // 2 + args.range - 1)
    warm = timed(lambda: segment_propagate(session, prompts(edited), truth.segments, RunContext(frame_range=(lo, hi))))
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
        "slices": args.slices, "slice_size": args.size, "image_size": args.image_size,
        "structures": args.structures, "cold_propagation_s": round(cold, 3), "frames_encoded_cold": encoded,
        "range": [lo, hi], "warm_repropagation_s": round(warm, 3),
        "frames_encoded_warm": session.cache.encoded_frames - encoded,
        "warm_per_slice_s": round(warm / (hi - lo + 1), 4),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
