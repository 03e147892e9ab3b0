"""Model registry, weight cache, checksums and checkpoint loading, on the real SAM2 architecture.

No test reaches the internet: the cache is a temporary folder, HF_HUB_OFFLINE=1 is set wherever
download() runs, and the one network-failure test talks to a closed port on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import sam2
import torch
from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

from SAM2FewShotLib.cli.models import add_models_parser, run_models
from SAM2FewShotLib.common.cache import CACHE_ENV, cache_dir
from SAM2FewShotLib.common.digests import file_digest
from SAM2FewShotLib.common.errors import ModelError
from SAM2FewShotLib.sam2 import build, models, weights
from SAM2FewShotLib.sam2.build import build_video_predictor
from SAM2FewShotLib.sam2.checkpoint import load_state_dict, read_state_dict

TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"
SMALL = "configs/sam2.1/sam2.1_hiera_s.yaml"
SIZE = 256  # the real architectures at a reduced input size, for CPU speed
NAMES = {"sam2-tiny", "sam2-small", "sam2-base-plus", "sam2-large", "sam2.1-tiny", "sam2.1-small",
         "sam2.1-base-plus", "sam2.1-large", "medsam2"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty weight cache, and no network for huggingface_hub."""
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


@pytest.fixture(scope="module")
def tiny_file(random_predictor, tmp_path_factory) -> Path:
    """The seeded random tiny weights, saved in sam2's {"model": state_dict} format."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_random.pt"
    torch.save({"model": random_predictor.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def target():
    """A tiny predictor with other random weights: what checkpoints are loaded into."""
    return build_video_predictor(TINY, image_size=SIZE, seed=5)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def with_spec(monkeypatch, name: str, **changes) -> models.ModelSpec:
    """Registry entry with test values (e.g. the SHA-256 of our random-weight file)."""
    spec = dataclasses.replace(models.REGISTRY[name], **changes)
    monkeypatch.setitem(models.REGISTRY, name, spec)
    return spec


# --- the registry -----------------------------------------------------------------------------------

def test_registry_lists_every_model_with_a_config_inside_sam2():
    assert set(models.REGISTRY) == NAMES
    sam2_dir = Path(sam2.__file__).parent
    for name, spec in models.REGISTRY.items():
        assert spec.name == name
        assert (sam2_dir / spec.config).is_file(), spec.config
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        if spec.hf_repo.startswith("facebook/"):  # names as sam2 itself downloads them
            assert HF_MODEL_ID_TO_FILENAMES[spec.hf_repo] == (spec.config, spec.hf_file)
            assert spec.image_size == 1024
    assert len({s.sha256 for s in models.REGISTRY.values()}) == len(NAMES)
    med = models.get_spec("medsam2")
    assert (med.family, med.config, med.image_size) == ("MedSAM2", TINY, 512)
    assert (med.hf_repo, med.hf_file) == ("wanglab/MedSAM2", "MedSAM2_latest.pt")


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ModelError) as e:
        models.get_spec("sam3-huge")
    one_line_error(e, "sam3-huge", "sam2.1-tiny", "medsam2")


def test_cache_dir_follows_the_environment_and_stays_outside_installs(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert weights.weights_path("medsam2") == tmp_path / "c" / "weights" / "medsam2" / "MedSAM2_latest.pt"
    monkeypatch.delenv(CACHE_ENV)
    default = cache_dir().resolve()
    assert default.name == "sam2fewshot" and Path.home().resolve() in default.parents
    package = Path(weights.__file__).resolve().parents[1]
    assert package not in default.parents and Path(sam2.__file__).resolve().parent not in default.parents


# --- building the registered architectures ----------------------------------------------------------

def test_medsam2_builds_as_tiny_at_512_px(target):
    spec = models.get_spec("medsam2")
    med = build_video_predictor(spec.config, image_size=spec.image_size, seed=0)
    # the same tensors as tiny (so MedSAM2's weights fit), RoPE grids for 512/16 = 32
    assert med.image_size == 512
    assert {k: v.shape for k, v in med.state_dict().items()} == {k: v.shape for k, v in target.state_dict().items()}
    attn = med.memory_attention.layers[0]
    assert attn.self_attn.freqs_cis.shape[0] == 32 * 32 == attn.cross_attn_image.freqs_cis.shape[0]
    with torch.inference_mode():
        out = med.forward_image(torch.zeros(1, 3, 512, 512))
    assert [tuple(f.shape[-2:]) for f in out["backbone_fpn"]] == [(128, 128), (64, 64), (32, 32)]


# --- loading checkpoints ----------------------------------------------------------------------------

def test_checkpoint_round_trip_gives_identical_parameters(random_predictor, tiny_file):
    fresh = build_video_predictor(TINY, image_size=SIZE, seed=11)
    assert not same_weights(fresh, random_predictor)
    load_state_dict(fresh, tiny_file)
    assert same_weights(fresh, random_predictor)


def test_bare_state_dict_and_build_with_checkpoint(random_predictor, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(random_predictor.state_dict(), bare)
    assert read_state_dict(bare).keys() == random_predictor.state_dict().keys()
    built = build_video_predictor(TINY, checkpoint=bare, image_size=SIZE, seed=3)
    assert same_weights(built, random_predictor)


def _truncated(d: Path, tiny_file: Path) -> Path:
    raw = tiny_file.read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    return d / "truncated.pt"


def _text(d: Path, _) -> Path:
    (d / "notes.pt").write_text("these are not weights\n")
    return d / "notes.pt"


def _random_bytes(d: Path, _) -> Path:
    (d / "noise.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return d / "noise.pt"


def _pickled_object(d: Path, _) -> Path:
    with (d / "counter.pt").open("wb") as f:
        pickle.dump(argparse.Namespace(note="not weights"), f, protocol=2)
    return d / "counter.pt"


def _torch_object(d: Path, _) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "extra": argparse.Namespace(epoch=3)}, d / "objects.pt")
    return d / "objects.pt"


def _no_state_dict(d: Path, _) -> Path:
    torch.save({"epoch": 3, "lr": 0.1}, d / "train_state.pt")
    return d / "train_state.pt"


def _empty(d: Path, _) -> Path:
    (d / "empty.pt").write_bytes(b"")
    return d / "empty.pt"


def _missing(d: Path, _) -> Path:
    return d / "nowhere.pt"


@pytest.mark.parametrize("make, needle", [
    (_truncated, "truncated or corrupt"),
    (_text, "not a PyTorch checkpoint"),
    (_random_bytes, "not a PyTorch checkpoint"),
    (_pickled_object, "refusing to load"),
    (_torch_object, "refusing to load"),
    (_no_state_dict, "holds no state dict"),
    (_empty, "is empty"),
    (_missing, "does not exist"),
])
def test_bad_checkpoint_files_are_one_line_errors(make, needle, tmp_path, tiny_file, target):
    path = make(tmp_path, tiny_file)
    before = snapshot(target)
    with pytest.raises(ModelError) as e:
        load_state_dict(target, path)
    one_line_error(e, needle)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_weights_of_another_architecture_are_refused_untouched(tmp_path, target):
    small = tmp_path / "small.pt"
    torch.save({"model": build_video_predictor(SMALL, image_size=SIZE, seed=0).state_dict()}, small)
    before = snapshot(target)
    with pytest.raises(ModelError) as e:
        load_state_dict(target, small)
    msg = one_line_error(e, "small.pt", "another architecture", "--model or --config")
    extra_blocks = {k.split(".")[3] for k in read_state_dict(small) if k not in before}
    assert extra_blocks == {"12", "13", "14", "15"}  # hiera small has 16 trunk blocks, tiny 12
    counts = re.search(r"(\d+) of the model's 471 tensors are missing .* and (\d+) are unexpected", msg)
    assert counts and int(counts[2]) > 0
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_wrong_tensor_shape_is_named(random_predictor, tmp_path, target):
    state = dict(random_predictor.state_dict())
    state["no_mem_embed"] = torch.zeros(1, 1, 128)
    path = tmp_path / "reshaped.pt"
    torch.save({"model": state}, path)
    with pytest.raises(ModelError) as e:
        load_state_dict(target, path)
    one_line_error(e, "1 tensors have other shapes", "no_mem_embed", "[1, 1, 128]", "[1, 1, 256]")


# --- checksums, cache, offline ------------------------------------------------------------------------

def test_checksum_mismatch(tiny_file, cache):
    with pytest.raises(ModelError) as e:
        weights.verify_file(tiny_file, "0" * 64)
    one_line_error(e, "checksum mismatch", tiny_file.name, file_digest(tiny_file))
    weights.verify_file(tiny_file, file_digest(tiny_file).upper())  # case does not matter
    with pytest.raises(ModelError) as e:  # the real published hash: our random file cannot match it
        weights.import_checkpoint("sam2.1-tiny", tiny_file)
    one_line_error(e, "checksum mismatch")
    assert not weights.is_cached("sam2.1-tiny") and not list(cache.rglob("*.pt*"))


@pytest.mark.parametrize("env_offline", [True, False])
def test_offline_with_an_empty_cache(cache, monkeypatch, env_offline):
    if not env_offline:
        monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelError) as e:
        weights.download("medsam2", offline=not env_offline)
    one_line_error(e, "weights for medsam2 are not in the cache", "(offline)", "--checkpoint FILE",
                   "sam2fewshot models import medsam2")
    with pytest.raises(ModelError):
        build.resolve("sam2.1-tiny", None, None, None, offline=True)


def test_network_failure_is_one_line(cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed local port, no internet
    with pytest.raises(ModelError) as e:
        weights.download("sam2.1-tiny", progress=False)
    one_line_error(e, "could not be downloaded", "facebook/sam2.1-hiera-tiny", "models import sam2.1-tiny")
    assert not weights.is_cached("sam2.1-tiny")


def test_import_then_offline_resolve_and_load(random_predictor, tiny_file, cache, monkeypatch):
    with_spec(monkeypatch, "sam2.1-tiny", sha256=file_digest(tiny_file))
    cached = weights.import_checkpoint("sam2.1-tiny", tiny_file)
    assert cached == weights.weights_path("sam2.1-tiny") and cached.read_bytes() == tiny_file.read_bytes()
    entry = weights.read_manifest()["sam2.1-tiny"]
    assert entry["sha256"] == file_digest(tiny_file) and entry["size"] == tiny_file.stat().st_size
    assert weights.download("sam2.1-tiny") == cached  # HF_HUB_OFFLINE=1: served from the cache
    resolved = build.resolve("sam2.1-tiny", None, None, SIZE, offline=True)
    assert resolved == build.ResolvedModel(TINY, cached, SIZE, "sam2.1-tiny")
    assert same_weights(build.load_predictor(resolved, "cpu"), random_predictor)

    with cached.open("ab") as f:  # damage the cached copy
        f.write(b"\0")
    with pytest.raises(ModelError) as e:
        weights.verify_cached("sam2.1-tiny")
    one_line_error(e, "checksum mismatch")
    with pytest.raises(ModelError) as e:
        weights.download("sam2.1-tiny")
    one_line_error(e, "fail their SHA-256 check", "models import sam2.1-tiny")


def test_without_a_published_hash_the_recorded_one_is_verified(tiny_file, cache, monkeypatch, tmp_path):
    with_spec(monkeypatch, "medsam2", sha256=None)
    with pytest.raises(ModelError) as e:  # not even a state dict: refused before copying
        weights.import_checkpoint("medsam2", _text(tmp_path, None))
    one_line_error(e, "not a PyTorch checkpoint")
    weights.import_checkpoint("medsam2", tiny_file)
    assert weights.known_sha256("medsam2") == file_digest(tiny_file)
    assert weights.verify_cached("medsam2") == file_digest(tiny_file)
    weights.weights_path("medsam2").write_bytes(b"other bytes")
    with pytest.raises(ModelError):
        weights.verify_cached("medsam2")


def test_resolve_with_a_local_checkpoint(tiny_file, cache):
    r = build.resolve("medsam2", tiny_file, None, None, offline=True)
    assert (r.config, r.checkpoint, r.image_size, r.name) == (TINY, tiny_file, 512, "medsam2")
    r = build.resolve(None, tiny_file, SMALL, 256, offline=True)
    assert (r.config, r.image_size, r.name) == (SMALL, 256, "custom (tiny_random.pt)")
    for args, needle in [((None, tiny_file, None, None), "needs --config"),
                         (("sam2.1-tiny", None, SMALL, None), "--config applies to --checkpoint"),
                         (("sam2.1-tiny", tiny_file.with_name("gone.pt"), None, None), "does not exist")]:
        with pytest.raises(ModelError) as e:
            build.resolve(*args, offline=True)
        one_line_error(e, needle)


def test_download_progress_reaches_an_engine_callback():
    seen = []
    bar = weights.progress_bar_class(lambda *a: seen.append(a))(total=10)
    bar.update(4)
    bar.update(6)
    assert seen == [("download", 4, 10), ("download", 10, 10)]


# --- the `models` command -----------------------------------------------------------------------------

def run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="sam2fewshot")
    add_models_parser(parser.add_subparsers(dest="command"))
    code = run_models(parser.parse_args(["models", *argv]))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_list_import_verify_commands(tiny_file, cache, monkeypatch, capsys):
    code, out, _ = run(["list"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "FAMILY", "INPUT", "CACHED", "SOURCE"]
    rows = {line.split()[0].rstrip("*"): line.split() for line in lines[1:-1]}
    assert set(rows) == NAMES and all(r[4] == "no" for r in rows.values())
    assert [r[0] for r in rows.values() if r[0].endswith("*")] == ["sam2.1-tiny*"]
    assert lines[-1] == "* the default (--model)"
    assert rows["medsam2"][2:4] == ["512", "px"] and rows["medsam2"][5] == "hf:wanglab/MedSAM2/MedSAM2_latest.pt"

    assert run(["verify"], capsys)[:2] == (0, f"no cached weights in {weights.weights_dir()}\n")
    with_spec(monkeypatch, "sam2-tiny", sha256=file_digest(tiny_file))
    code, out, _ = run(["import", "sam2-tiny", str(tiny_file)], capsys)
    assert code == 0 and str(weights.weights_path("sam2-tiny")) in out
    code, out, _ = run(["list"], capsys)
    assert [line.split()[4] for line in out.splitlines() if line.startswith("sam2-tiny ")] == ["yes"]
    code, out, _ = run(["download", "sam2-tiny", "--offline"], capsys)
    assert code == 0 and "verified" in out
    code, out, err = run(["verify"], capsys)
    assert code == 0 and out == f"sam2-tiny: ok (SHA-256 {file_digest(tiny_file)})\n" and not err

    weights.weights_path("sam2-tiny").write_bytes(b"tampered")
    code, out, err = run(["verify", "sam2-tiny"], capsys)
    assert code == 1 and err.startswith("sam2-tiny: FAILED: checksum mismatch") and len(err.splitlines()) == 1
    with pytest.raises(ModelError):
        run(["verify", "nonesuch"], capsys)


def test_models_errors_through_the_main_cli(cache, capsys):
    from SAM2FewShotLib.cli.main import main

    assert main(["models", "download", "sam2.1-large", "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights for sam2.1-large are not in the cache" in err
    assert main(["models", "import", "sam2.1-tiny", str(cache / "absent.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
