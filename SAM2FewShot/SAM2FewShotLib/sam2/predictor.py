"""The SAM2 video predictor, fed from memory: frames from a FrameSource, features from a FeatureCache.

One core serves every method; they differ only in which frames condition it. sam2's own
``init_state`` reads JPEG files from a folder; ``init_volume_state`` builds the same inference
state from in-memory frames, and ``_get_image_feature`` reads the batched feature cache.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from sam2.sam2_video_predictor import SAM2VideoPredictor

from .feature_cache import FeatureCache
from .frames import FrameSource


class Float32Memories:
    """sam2 stores memories in bfloat16, which only works under CUDA autocast: a memory made of
    stored features alone (no object pointer to promote the dtype), as when a slice is tracked
    towards a prompt that lies ahead, fails in a float32 linear layer. Unless the predictor runs
    under bfloat16 autocast (CUDA by default, or precision "bf16"), they stay float32.

    Mixed into our predictor and into the stock twin the equivalence checks compare it with.
    """

    def _run_single_frame_inference(self, *args, **kwargs):
        out, pred_masks = super()._run_single_frame_inference(*args, **kwargs)
        out["maskmem_features"] = self._storable(out["maskmem_features"])
        return out, pred_masks

    def _run_memory_encoder(self, *args, **kwargs):
        features, pos_enc = super()._run_memory_encoder(*args, **kwargs)
        return self._storable(features), pos_enc

    def _storable(self, features):
        if features is None or self.precision == "bf16":
            return features
        return features.float()


class MaskHintPrompts:
    """Box or point prompts with a dense mask hint: a new method over sam2's own prompt path, shared
    by our predictor and the stock twin of the equivalence checks."""

    MASK_HINT_LOGIT = 10.0  # a hint's confidence: well inside sam2's clamp of previous logits (+/-32)

    def add_box_with_mask_hint(self, inference_state, frame_idx, obj_id, box=None, points=None, labels=None,
                               mask_hint: np.ndarray | None = None):
        """A box and/or points prompt with a dense mask hint that SAM2 refines, not copies.

        sam2 feeds a frame's previous low-resolution logits to the mask decoder along with new
        clicks (``prev_sam_mask_logits`` in add_new_points_or_box); the hint takes their place, as
        +/-MASK_HINT_LOGIT logits at image size (the decoder resizes them). A hint alone goes with an
        empty point set, so the decoder still runs from the dense prompt.
        """
        if mask_hint is None:
            return self.add_new_points_or_box(inference_state, frame_idx, obj_id, points=points, labels=labels,
                                              box=box)
        obj_idx = self._obj_id_to_idx(inference_state, obj_id)
        tracked = frame_idx in inference_state["frames_tracked_per_obj"][obj_idx]
        is_cond = not tracked or self.add_all_frames_to_correct_as_cond  # where sam2 looks the logits up
        key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
        temp = inference_state["temp_output_dict_per_obj"][obj_idx][key]
        temp[frame_idx] = {"pred_masks": self.mask_hint_logits(mask_hint)}  # read back as the previous logits
        if box is None and points is None:
            points, labels = np.zeros((0, 2), np.float32), np.zeros(0, np.int32)
        try:
            return self.add_new_points_or_box(inference_state, frame_idx, obj_id, points=points, labels=labels,
                                              box=box)
        except BaseException:
            temp.pop(frame_idx, None)
            raise

    def mask_hint_logits(self, mask: np.ndarray) -> torch.Tensor:
        """(1, 1, S, S) logits of a slice mask at the model's image size."""
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32), device=self.device)[None, None]
        size = (self.image_size, self.image_size)
        shrink = max(m.shape[-2:]) > self.image_size
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        return (2.0 * m - 1.0) * self.MASK_HINT_LOGIT


class VolumePredictor(Float32Memories, MaskHintPrompts, SAM2VideoPredictor):
    """sam2's video predictor with in-memory frames and a batched, reusable feature cache."""

    precision = "fp32"  # or "bf16": what its forward work runs in (build.build_video_predictor sets it)

    def init_volume_state(
        self,
        frames: FrameSource,
        cache: FeatureCache | None = None,
        offload_state_to_cpu: bool = False,
    ) -> dict:
        """An inference state over ``frames`` (same keys as sam2's init_state, no files read).

        Passing the ``cache`` of an earlier state over the same frames reuses its encoder features; a
        StackedCache adds support frames after the query's (their indices follow the query's).
        """
        device = self.device
        if cache is None:
            cache = FeatureCache(self, frames, device)
        storage = torch.device("cpu") if offload_state_to_cpu else device
        state = {
            "images": frames,
            "feature_cache": cache,
            "num_frames": len(cache),
            "offload_video_to_cpu": True,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": frames.height,
            "video_width": frames.width,
            "device": device,
            "storage_device": storage,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }
        return state

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        """Features of one frame from the cache, expanded to ``batch_size`` objects."""
        backbone_out = inference_state["feature_cache"].get(frame_idx)
        expanded = {
            "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in backbone_out["backbone_fpn"]],
            "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in backbone_out["vision_pos_enc"]],
        }
        # sam2 returns the input image first; no caller uses it, so none is kept.
        return (None,) + self._prepare_backbone_features(expanded)
