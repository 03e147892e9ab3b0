"""A Python that has only what a fresh 3D Slicer 5.10 ships, for the registration path's tests (issue 25).

Put this folder first on PYTHONPATH: Python imports ``sitecustomize`` at start-up, and from then on any
import of a top-level package outside the standard library and Slicer's bundled set fails as it would in
a Slicer where nothing was installed. The set is read from Slicer's source, tag v5.10.0:
SuperBuild/External_python-{numpy,scipy,dicom-requirements,requests-requirements,pythonqt-requirements,
extension-manager-requirements,extension-manager-ssl-requirements,pip,setuptools,wheel}.cmake, and
SimpleITK and VTK, which Slicer builds itself. ``slicer`` stands for Slicer's own modules (the slicer-core
wheel in the tests); the engine and the test's own modules are allowed too. Children inherit PYTHONPATH,
so the background worker runs under the same rule.
"""

import importlib.abc
import os
import sys

SLICER_5_10_PACKAGES = {
    "numpy", "scipy", "SimpleITK", "vtk", "vtkmodules", "slicer", "slicer_core",  # slicer-core: Slicer itself
    "pydicom", "six", "PIL", "retrying", "dicomweb_client",  # dicom-requirements
    "certifi", "idna", "charset_normalizer", "urllib3", "requests",  # requests-requirements
    "packaging", "pyparsing",  # pythonqt-requirements
    "chardet", "couchdb", "gitdb", "smmap", "git",  # extension-manager-requirements
    "cryptography", "jwt", "wrapt", "deprecated", "pycparser", "cffi", "nacl", "dateutil", "typing_extensions",
    "github",  # extension-manager-ssl-requirements
    "pip", "setuptools", "pkg_resources", "wheel", "_distutils_hack",
}
OURS = {"SAM2FewShotLib", "SAM2FewShotPanel", "sitecustomize", "phantoms", "bare_walk"}
ALLOWED = set(sys.stdlib_module_names) | SLICER_5_10_PACKAGES | OURS


class NotInBareSlicer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ALLOWED:
            return None
        raise ModuleNotFoundError(f"No module named {name!r} (a fresh 3D Slicer 5.10 does not ship it)", name=name)


if os.environ.get("SAM2FEWSHOT_BARE_SLICER") == "1":
    sys.meta_path.insert(0, NotInBareSlicer())
