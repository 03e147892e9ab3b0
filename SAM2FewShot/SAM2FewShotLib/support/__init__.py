"""The building blocks of the support-based methods: representative support slices, augmentation,
slice features (SAM2, intensity, DINOv2) and matching, the policy that turns matched support
slices into SAM2 conditioning memories, and LoRA adapters fitted on a support set. Imports
``sam2``, ``io`` and ``common``.
"""
