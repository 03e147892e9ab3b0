"""SAM2FewShot engine: few-shot 3D segmentation with SAM2. Imports no Qt."""

__version__ = "0.1.0"
