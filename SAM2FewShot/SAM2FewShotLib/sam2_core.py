"""The SAM2 video predictor, fed from memory: frames from a FrameSource, features from a FeatureCache.

One core serves every method; they differ only in which frames condition it. sam2's own
``init_state`` reads JPEG files from a folder; ``init_volume_state`` builds the same inference
state from in-memory frames, and ``_get_image_feature`` reads the batched feature cache.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor

from .feature_cache import FeatureCache
from .frames import FrameSource


class VolumePredictor(SAM2VideoPredictor):
    """sam2's video predictor with in-memory frames and a batched, reusable feature cache."""

    def init_volume_state(
        self,
        frames: FrameSource,
        cache: Optional[FeatureCache] = None,
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

    # sam2 stores memories in bfloat16, which only works under CUDA autocast: a memory made of
    # stored features alone (no object pointer to promote the dtype), as when a slice is tracked
    # towards a prompt that lies ahead, fails in a float32 linear layer. Elsewhere keep float32.
    def _run_single_frame_inference(self, *args, **kwargs):
        out, pred_masks = super()._run_single_frame_inference(*args, **kwargs)
        out["maskmem_features"] = self._storable(out["maskmem_features"])
        return out, pred_masks

    def _run_memory_encoder(self, *args, **kwargs):
        features, pos_enc = super()._run_memory_encoder(*args, **kwargs)
        return self._storable(features), pos_enc

    def _storable(self, features):
        if features is None or self.device.type == "cuda":
            return features
        return features.float()
