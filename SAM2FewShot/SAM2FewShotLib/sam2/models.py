"""The SAM2 models we know: config, Hugging Face source and published SHA-256 of each.

Pure data, no heavy imports: the Slicer panel lists the models before torch is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import ModelError

DEFAULT_MODEL = "sam2.1-tiny"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    config: str  # a config name inside the installed sam2 package
    hf_repo: str
    hf_file: str
    sha256: str | None  # published SHA-256 of hf_file; None: the hub's own LFS hash is used
    image_size: int
    description: str


def _sam2(name: str, family: str, size: str, cfg: str, sha256: str, description: str) -> ModelSpec:
    """A Meta checkpoint: repo and file named as in sam2/build_sam.py HF_MODEL_ID_TO_FILENAMES."""
    stem = "sam2" if family == "SAM2" else "sam2.1"
    return ModelSpec(name, family, f"configs/{stem}/{stem}_hiera_{cfg}.yaml", f"facebook/{stem}-hiera-{size}",
                     f"{stem}_hiera_{size.replace('-', '_')}.pt", sha256, 1024, description)


# SHA-256 sources (public, cross-checked):
# - SAM2 and SAM2.1: the hashes of Meta's release files (dl.fbaipublicfiles.com/segment_anything_2/
#   072824/ and 092824/), which the facebook/* Hugging Face repos serve unchanged: HASHES in
#   computational-cell-analytics/micro-sam micro_sam/v2/util.py; the SAM2 ones also in
#   mazurowski-lab/SlicerSegmentWithSAM SegmentWithSAM/SegmentWithSAM.py (downloadFileIntoCache
#   checksums). Several projects pin the same values against the Hugging Face URLs (sam2.1 tiny with
#   size 156008466 for facebook/sam2.1-hiera-tiny, base-plus, large).
# - MedSAM2_latest.pt (156040129 bytes): pinned against huggingface.co/wanglab/MedSAM2 by several
#   independent public projects (download scripts and model manifests).
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in (
    _sam2("sam2-tiny", "SAM2", "tiny", "t",
          "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", "SAM 2 Hiera tiny (July 2024)"),
    _sam2("sam2-small", "SAM2", "small", "s",
          "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", "SAM 2 Hiera small (July 2024)"),
    _sam2("sam2-base-plus", "SAM2", "base-plus", "b+",
          "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", "SAM 2 Hiera base+ (July 2024)"),
    _sam2("sam2-large", "SAM2", "large", "l",
          "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b", "SAM 2 Hiera large (July 2024)"),
    _sam2("sam2.1-tiny", "SAM2.1", "tiny", "t",
          "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", "SAM 2.1 Hiera tiny: fastest"),
    _sam2("sam2.1-small", "SAM2.1", "small", "s",
          "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", "SAM 2.1 Hiera small"),
    _sam2("sam2.1-base-plus", "SAM2.1", "base-plus", "b+",
          "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", "SAM 2.1 Hiera base+"),
    _sam2("sam2.1-large", "SAM2.1", "large", "l",
          "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", "SAM 2.1 Hiera large: most accurate"),
    # MedSAM2 (Bo Wang lab, github.com/bowang-lab/MedSAM2): its sam2/configs/sam2.1_hiera_t512.yaml is
    # sam2.1_hiera_t.yaml with image_size 512 and RoPE feat_sizes [32, 32], which is exactly what
    # build.size_overrides(512) sets; medsam2_infer_video.py pairs it with MedSAM2_latest.pt.
    ModelSpec("medsam2", "MedSAM2", "configs/sam2.1/sam2.1_hiera_t.yaml", "wanglab/MedSAM2", "MedSAM2_latest.pt",
              "c92743b99f00d078bf32a3afcc38aaa9faf1c1692dffe3eaa7a90938c1991060", 512,
              "MedSAM2: SAM 2.1 tiny fine-tuned on 3D medical images and videos, 512 px"),
)}


# Weights of other networks (e.g. DINOv2 for retrieval) that share the cache, download and checksum
# rules but are no SAM2 model: never listed, never resolved as one.
OTHER_WEIGHTS: dict[str, ModelSpec] = {}


def register_weights(spec: ModelSpec) -> None:
    """Let download/verify/import serve a non-SAM2 weights file under its own name."""
    if spec.name in REGISTRY:
        raise ModelError(f"'{spec.name}' is already a SAM2 model name")
    OTHER_WEIGHTS[spec.name] = spec


def get_spec(name: str) -> ModelSpec:
    spec = REGISTRY.get(name) or OTHER_WEIGHTS.get(name)
    if spec is None:
        raise ModelError(f"unknown model '{name}': known models are {', '.join(REGISTRY)}")
    return spec
