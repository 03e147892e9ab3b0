"""Speed against a peer-style pipeline: same frames, same weights, same process, same run.

Peer tools write every slice as a JPEG file, call stock sam2's ``init_state(video_path=folder)``
(which reads and resizes them all with PIL), add a mask on one slice and run forward-only
``propagate_in_video``. This engine keeps the frames in memory, encodes them (in batches on a GPU) into a
feature cache and propagates from the prompted slice. Both start from the same volume and the same
normalisation, prompt the same masks on slice 0 (so forward-only covers every slice and both do
the same model work) and end with the same label array. Time inside the model's main modules is
measured with forward hooks; the rest is the pipeline's own cost.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..io.normalization import Normalization
from ..io.volume import LabelMap, Volume
from ..sam2.devices import model_autocast
from .metrics import dice

MODEL_PARTS = ("image_encoder", "memory_attention", "memory_encoder", "sam_mask_decoder", "sam_prompt_encoder")
JPEG_QUALITY = 95  # what peer tools use


class ForwardTimer:
    """Seconds spent inside forward calls of the model's main modules, per module.

    On CUDA each boundary synchronises, so kernels are charged to the module that launched them.
    """

    def __init__(self, model, parts=MODEL_PARTS):
        self.model = model
        self.parts = parts
        self.seconds = {p: 0.0 for p in parts}
        self.calls = {p: 0 for p in parts}
        self._handles = []
        self._started: dict[str, list[float]] = {p: [] for p in parts}
        self._sync = getattr(model, "device", torch.device("cpu")).type == "cuda"

    def __enter__(self) -> ForwardTimer:
        for name in self.parts:
            module = getattr(self.model, name)
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, name):
        def hook(module, args):
            self._started[name].append(self._now())
        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.seconds[name] += self._now() - self._started[name].pop()
            self.calls[name] += 1
        return hook


def stock_predictor(predictor, config: str):
    """Stock sam2 ``SAM2VideoPredictor`` from the same config and image size, with our predictor's weights."""
    from sam2.build_sam import build_sam2_video_predictor

    from ..sam2.build import size_overrides

    stock = build_sam2_video_predictor(config, ckpt_path=None, device="cpu",
                                       hydra_overrides_extra=size_overrides(predictor.image_size))
    stock.load_state_dict(predictor.state_dict(), strict=True)
    stock.fill_hole_area = 0  # needs sam2's CUDA extension; ours has it off too
    stock.precision = predictor.precision  # the same --precision as ours
    return stock.to(predictor.device).eval()


def _timing(wall: float, cpu: float, timer: ForwardTimer, n: int, **extra) -> dict:
    """Wall and process CPU time (the CPU time suffers less when other jobs share the cores)."""
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "per_slice_s": round(wall / n, 4),
            "model_s": round(timer.total, 3),
            "outside_model_s": round(wall - timer.total, 3),
            "outside_model_share": round((wall - timer.total) / wall, 4) if wall > 0 else None,
            "model_parts_s": {k: round(v, 3) for k, v in timer.seconds.items()},
            "model_calls": dict(timer.calls), **extra}


def run_ours(predictor, volume: Volume, prompt_masks: dict[int, np.ndarray], labels: LabelMap,
             normalization: Normalization) -> tuple[np.ndarray, dict]:
    """This engine: in-memory frames, batched cached features, propagation from slice 0."""
    from ..methods.propagate import segment_propagate
    from ..sam2.conditioning import Prompt
    from ..sam2.session import VolumeSession

    with ForwardTimer(predictor) as timer:
        start, cpu = time.perf_counter(), time.process_time()
        session = VolumeSession(predictor, volume, axis=0, normalization=normalization)
        prompts = [Prompt(frame=0, obj_id=v, mask=m) for v, m in prompt_masks.items()]
        result, _ = segment_propagate(session, prompts, labels.segments)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return result.volume.array, _timing(wall, cpu, timer, volume.array.shape[0])


def run_reference(stock, volume: Volume, prompt_masks: dict[int, np.ndarray], normalization: Normalization,
                  workdir: Path | None = None) -> tuple[np.ndarray, dict]:
    """The peer pipeline: JPEG files, stock init_state, add_new_mask on slice 0, forward-only propagation."""
    from PIL import Image

    from ..sam2.propagation import labels_from_logits

    n = volume.array.shape[0]
    with tempfile.TemporaryDirectory(prefix="sam2fewshot_jpeg_", dir=workdir) as folder, ForwardTimer(stock) as timer:
        start, cpu = time.perf_counter(), time.process_time()
        gray = np.round(normalization.apply(volume.array, axis=0) * 255.0).astype(np.uint8)
        for t in range(n):
            Image.fromarray(gray[t]).convert("RGB").save(Path(folder) / f"{t:05d}.jpg", quality=JPEG_QUALITY)
        written = time.perf_counter()
        out = np.zeros(volume.array.shape, np.int32)
        with torch.inference_mode(), model_autocast(stock):
            state = stock.init_state(video_path=folder)
            loaded = time.perf_counter()
            for obj_id, mask in prompt_masks.items():
                stock.add_new_mask(state, 0, obj_id, torch.from_numpy(mask))
            for t, obj_ids, logits in stock.propagate_in_video(state):
                out[t] = labels_from_logits(logits[:, 0].float().cpu(), obj_ids)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return out, _timing(wall, cpu, timer, n, jpeg_write_s=round(written - start, 3),
                        init_state_s=round(loaded - written, 3), jpeg_quality=JPEG_QUALITY)


def peer_speed(predictor, config: str, n_slices: int, size: int = 256, n_structures: int = 3,
               seed: int = 0, workdir: Path | None = None) -> dict:
    """Wall time of both pipelines on one synthetic volume, their ratio and time outside the model."""
    from .synthetic import slice_masks, synthetic_case

    volume, truth = synthetic_case(n_slices, size, n_structures, seed=seed)
    normalization = Normalization().resolved(volume.array)
    masks = slice_masks(truth, 0)
    stock = stock_predictor(predictor, config)
    with torch.inference_mode(), model_autocast(predictor):  # first-call costs paid by neither
        predictor.forward_image(torch.zeros(1, 3, predictor.image_size, predictor.image_size,
                                            device=predictor.device))
    ours_labels, ours = run_ours(predictor, volume, masks, truth, normalization)
    ref_labels, ref = run_reference(stock, volume, masks, normalization, workdir)
    del stock
    return {
        "slices": n_slices, "slice_shape": [size, size], "structures": n_structures,
        "image_size": predictor.image_size, "device": str(predictor.device), "prompt": "masks on slice 0",
        "ours": ours, "reference": ref,
        "ratio_reference_over_ours": round(ref["wall_s"] / ours["wall_s"], 3) if ours["wall_s"] > 0 else None,
        "cpu_ratio_reference_over_ours": round(ref["cpu_s"] / ours["cpu_s"], 3) if ours["cpu_s"] > 0 else None,
        "agreement_dice": {s.name: round(dice(ours_labels == s.value, ref_labels == s.value), 4)
                           for s in truth.segments},
    }
