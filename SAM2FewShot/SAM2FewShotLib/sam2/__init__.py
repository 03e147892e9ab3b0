"""The one SAM2 core every method conditions: model registry, weight download and checkpoints, building
the predictor, frames (a volume as a video of tensors), the batched encoder-feature cache and its
disk offloading, propagation in both directions, the VolumeSession that keeps a query warm, and the
LiveSession that encodes it in the background and answers clicks.
Imports ``io`` and ``common``. Its registry, weights and estimate modules import no torch at module level.
"""
