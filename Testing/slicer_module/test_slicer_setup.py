"""First use in Slicer: pinned packages, install commands, consent wording, GPU advice, weight download."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from phantoms import REPO
from SAM2FewShotLib.common.cache import CACHE_ENV
from SAM2FewShotLib.common.errors import InputError, ModelError
from SAM2FewShotLib.sam2.models import REGISTRY
from SAM2FewShotLib.slicer import install
from SAM2FewShotLib.slicer.install import REQUIREMENTS, plan_install

ROOT = REPO


def pyproject_dependencies() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pins = {}
    for requirement in data["project"]["dependencies"]:
        name, specifier = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
        pins[name.lower()] = specifier.strip()
    return pins


def test_pins_are_pyprojects_and_sam2_comes_without_its_dependencies():
    pins = pyproject_dependencies()
    ours = {r.distribution.lower(): r.specifier for r in REQUIREMENTS if r.distribution != "sam2"}
    assert ours == pins
    sam2 = next(r for r in REQUIREMENTS if r.distribution == "sam2")
    assert sam2.specifier == "==1.1.0" and sam2.no_deps
    setup_script = (ROOT / "scripts" / "setup_env.sh").read_text(encoding="utf-8")
    assert "SAM2_VERSION=1.1.0" in setup_script and "--no-deps" in setup_script
    assert all(r.distribution != "torch" for r in REQUIREMENTS)  # torch comes from the PyTorch extension


def test_pip_commands_put_sam2_alone_and_never_touch_slicers_own_packages():
    commands = install.pip_commands(REQUIREMENTS)
    assert commands[0] == ["sam2==1.1.0", "--no-deps", "--no-build-isolation"]
    assert all("--no-deps" not in c for c in commands[1:]) and len(commands) == 2
    flat = [a for c in commands for a in c]
    for own in ("numpy", "SimpleITK", "pillow"):
        assert not any(a.startswith(own) for a in flat)
    assert "huggingface_hub>=1.1.0" in commands[1] and "hydra-core>=1.3.2" in commands[1]  # minimums in Slicer
    assert install.pip_commands([]) == []
    assert install.PIP_ENVIRONMENT == {"SAM2_BUILD_CUDA": "0"}


def test_the_plan_installs_what_is_missing_or_too_old():
    installed = {r.distribution: r.specifier.lstrip("=<>").split(",")[0] for r in REQUIREMENTS}
    assert not plan_install(installed).needed
    old = {**installed, "hydra-core": None, "tqdm": "4.60.0", "huggingface_hub": "2.4.0"}
    plan = plan_install(old)
    assert [r.distribution for r in plan.install] == ["hydra-core", "tqdm"] and not plan.unfixable
    broken = plan_install({**installed, "numpy": None, "SimpleITK": "2.0.0"})
    assert not broken.install and len(broken.unfixable) == 2 and "reinstall Slicer" in broken.unfixable[0]
    shared = plan_install({**installed, "huggingface_hub": "1.5.0", "tqdm": "4.69.1"})  # another extension's
    assert not shared.needed  # newer than our minimums: kept, not upgraded to our pins
    assert "older than 2.4.0" in plan_install({**installed, "SimpleITK": "2.3.1"}).unfixable[0]
    bare = {"numpy": "2.0.2", "SimpleITK": "2.5.0", "pillow": "11.2.1"}  # what a fresh Slicer 5.10 ships
    assert not plan_install(bare, requirements=install.requirements_for(needs_model=False)).needed
    assert [r.distribution for r in plan_install(bare).install][:1] == ["sam2"]  # SAM2 methods install theirs


def test_this_environment_needs_nothing(monkeypatch):
    assert not plan_install().needed  # the test venv has every pinned package
    assert install.torch_problem(install.torch_version()) is None

    def must_not_ask(question):
        raise AssertionError(f"asked although nothing is missing: {question}")

    assert install.ensure_installed(True, must_not_ask, must_not_ask, must_not_ask)


def test_versions_and_torch_checks():
    assert install.version_tuple("2.5.1+cu121") == (2, 5, 1)
    assert install.version_tuple("1.1.0rc2") == (1, 1, 0)
    assert install.version_tuple("0.1.10") > install.version_tuple("0.1.9")
    assert install.at_least("1.26", "1.26.0") and not install.at_least("1.25.9", "1.26")
    assert install.torch_problem(None) == "PyTorch is not installed"
    assert "too old" in install.torch_problem("2.1.2")
    assert install.torch_problem("2.5.1") is None


def test_consent_names_everything_that_will_be_installed():
    plan = plan_install({})
    text = install.consent_text(plan, "PyTorch is not installed")
    assert "PyTorch >=2.5.1 through the PyTorch extension" in text
    for requirement in plan.install:
        assert requirement.pip_argument in text
    assert "numpy" not in text and text.rstrip().endswith("Install now?")


def test_gpu_advice_suggests_a_smaller_model_of_the_same_family_or_the_cpu():
    torch = pytest.importorskip("torch")
    from SAM2FewShotLib.sam2 import devices

    gib = 2 ** 30
    for name in REGISTRY:
        assert devices.gpu_advice(name, 80 * gib) is None
    advice = devices.gpu_advice("sam2.1-large", 5 * gib)
    assert "sam2.1-small" in advice and "5.0 GiB is free" in advice
    assert "sam2-small" in devices.gpu_advice("sam2-large", 5 * gib)
    assert "CPU" in devices.gpu_advice("sam2.1-tiny", 1 * gib)
    sizes = [devices.gpu_gib_needed(n) for n in ("sam2.1-tiny", "sam2.1-small", "sam2.1-base-plus", "sam2.1-large")]
    assert sizes == sorted(sizes)
    assert devices.gpu_advice_for("sam2.1-large", torch.device("cpu")) is None  # measured on CUDA only


def test_a_download_that_cannot_happen_ends_with_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    download = install.BackgroundDownload("sam2.1-tiny", offline=True)
    download.join(30)
    assert download.finished and isinstance(download.error, ModelError) and download.path is None
    assert "offline" in str(download.error) and download.fraction == 0.0
    assert not any(tmp_path.rglob("*.pt"))



def test_an_old_slicer_is_told_so_before_anything_is_installed_or_asked():
    calls = []

    def record(*args):
        calls.append(args)
        return True

    for slicer_version, python in (((5, 8), (3, 9)), ((5, 10), (3, 9)), ((4, 11), (3, 12))):
        with pytest.raises(InputError, match=r"needs 3D Slicer 5\.10 or later .*download\.slicer\.org") as caught:
            install.ensure_installed(True, record, record, record, record, slicer_version, python)
        assert "\n" not in str(caught.value)
    assert calls == []  # no question, no pip, no PyTorch
    assert install.host_problem((5, 10), (3, 12)) is None and install.host_problem((5, 12), (3, 12)) is None


def test_install_asks_for_minimums_and_holds_every_package_already_there(monkeypatch):
    """Slicer's Python is shared: pip gets '>=minimum' and a constraints file pinning what is installed."""
    plan = plan_install({"numpy": "2.2.0", "SimpleITK": "2.5.0", "pillow": "11.0.0"})
    installed = {"numpy": "2.2.0", "simpleitk": "2.5.0", "requests": "2.32.3", "tqdm": "4.60.0"}
    text = install.constraints_text(installed, plan.install)
    assert "numpy==2.2.0\n" in text and "simpleitk==2.5.0\n" in text and "requests==2.32.3\n" in text
    assert "tqdm" not in text  # being installed (too old): not held
    seen = []
    monkeypatch.setattr(install, "installed_distributions", lambda: installed)
    monkeypatch.setattr(install, "plan_install", lambda requirements: plan)
    monkeypatch.setattr(install, "torch_problem", lambda version: None)

    def pip(arguments):
        constraints = arguments[arguments.index("-c") + 1]
        seen.append((arguments, Path(constraints).read_text(encoding="utf-8")))

    assert install.ensure_installed(True, lambda question: True, pip, None, lambda line: None)
    assert [a[0] for a, _ in seen] == ["sam2==1.1.0", "huggingface_hub>=1.1.0"]  # sam2 exact and alone
    assert all(text == held for _, held in seen) and not Path(seen[0][0][-1]).exists()  # removed after


def test_one_install_at_a_time_and_the_panel_can_tell(monkeypatch):
    shipped = {"numpy": "2.2.0", "SimpleITK": "2.5.0", "pillow": "11.0.0"}  # what Slicer brings
    monkeypatch.setattr(install, "plan_install", lambda requirements: plan_install(shipped))
    monkeypatch.setattr(install, "torch_problem", lambda version: None)
    inner = []

    def pip(arguments):  # while pip runs (Slicer keeps processing events), the user clicks Apply again
        assert install.is_installing()
        with pytest.raises(InputError, match="being installed"):
            install.ensure_installed(False, lambda q: True, pip, None, lambda line: None)
        inner.append(arguments)

    assert install.ensure_installed(False, lambda q: True, pip, None, lambda line: None)
    assert inner and not install.is_installing()

    states = []  # the panel refreshes its states from on_start: it must see itself locked there, before pip runs

    def asked(question):
        states.append(("asked", install.is_installing()))
        return True

    assert install.ensure_installed(False, asked, lambda arguments: states.append(("pip", install.is_installing())),
                                    None, lambda line: None, on_start=lambda: states.append(("locked",
                                                                                               install.is_installing())))
    assert states[:3] == [("asked", True), ("locked", True), ("pip", True)]
    assert not install.ensure_installed(False, lambda q: False, pip, None, lambda line: None,
                                        on_start=lambda: states.append("never"))  # declined: no lock shown
    assert "never" not in states
