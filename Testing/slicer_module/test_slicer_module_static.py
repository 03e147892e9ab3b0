"""Static checks of the Slicer module (3D Slicer cannot run here): code, panel, packaging, engine purity.

The module file must compile for Python 3.11; every widget its code touches must exist in the .ui
with a class that has the attributes and signals the code uses; the CMake lists must name every
script and resource; the engine package must never import Qt or Slicer's GUI helpers.
"""

from __future__ import annotations

import ast
import py_compile
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from phantoms import REPO

ROOT = REPO
MODULE_DIR = ROOT / "SAM2FewShot"
MODULE_FILE = MODULE_DIR / "SAM2FewShot.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SAM2FewShot.ui"
ENGINE = MODULE_DIR / "SAM2FewShotLib"
PANEL = MODULE_DIR / "SAM2FewShotPanel"  # the module's Logic, parameter node and self-test (Qt allowed)
EFFECT = MODULE_DIR / "SAM2FewShotEffect"  # the Segment Editor's SAM2 effect (Qt allowed)
LOGIC_FILE = PANEL / "logic.py"
REVIEW_FILE = PANEL / "review_section.py"  # the "Review a cohort" section's wiring (self.ui as the Widget's)
WIRING_FILES = (MODULE_FILE, REVIEW_FILE)  # every file that touches the panel's widgets
BRIDGE_FILES = {"slicer/mrml_volume.py", "slicer/mrml_segments.py"}  # may import Slicer's MRML classes

# Widget-name suffix -> the class the panel must use for it (longest suffix first).
SUFFIX_CLASSES = (
    ("CollapsibleButton", "ctkCollapsibleButton"), ("RadioButton", "QRadioButton"), ("CheckBox", "QCheckBox"),
    ("Button", "QPushButton"), ("CheckableSelector", "qMRMLCheckableNodeComboBox"),
    ("Selector", "qMRMLNodeComboBox"), ("ComboBox", "QComboBox"),
    ("SpinBox", "QSpinBox"), ("LineEdit", "ctkPathLineEdit"), ("TextEdit", "QPlainTextEdit"),
    ("ProgressBar", "QProgressBar"), ("TableWidget", "QTableWidget"), ("ListWidget", "QListWidget"),
    ("Label", "QLabel"), ("Widget", "QWidget"),
)
WIDGET_NAME = re.compile(r"^[a-z][A-Za-z0-9]*(" + "|".join(s for s, _ in SUFFIX_CLASSES) + r")$")
COMMON = {"connect", "enabled", "visible", "toolTip", "setEnabled", "setVisible", "blockSignals", "show", "hide"}
# What the module may use on each class (PythonQt properties and methods that exist on it).
API = {
    "QPushButton": {"text", "checked", "click"},
    "QRadioButton": {"text", "checked"},
    "QCheckBox": {"text", "checked"},
    "QLabel": {"text", "wordWrap"},
    "QComboBox": {"addItem", "addItems", "setItemData", "model", "findData", "currentIndex", "currentData",
                  "currentText", "setCurrentText", "count", "clear", "itemData", "lineEdit"},
    "QSpinBox": {"value", "minimum", "maximum", "setRange"},
    "QProgressBar": {"value", "setValue", "maximum", "minimum", "format"},
    "QPlainTextEdit": {"appendPlainText", "plainText", "clear", "setPlainText"},
    "QTableWidget": {"setColumnCount", "setHorizontalHeaderLabels", "setRowCount", "setItem", "item",
                     "setSortingEnabled", "resizeColumnsToContents", "clearContents", "rowCount"},
    "QListWidget": {"clear", "addItem", "item", "count"},
    "qMRMLNodeComboBox": {"currentNode", "setCurrentNode", "currentNodeID", "baseName", "setMRMLScene", "addNode"},
    "qMRMLCheckableNodeComboBox": {"checkedNodes", "uncheckedNodes", "setCheckState"},  # its 5.10 header
    "ctkPathLineEdit": {"currentPath", "filters", "findChild"},
    "ctkCollapsibleButton": {"collapsed", "text"},
    "QWidget": set(),
}
SIGNALS = {
    "clicked(bool)": {"QPushButton"}, "toggled(bool)": {"QCheckBox", "QRadioButton", "QPushButton"},
    "currentIndexChanged(int)": {"QComboBox"}, "editTextChanged(QString)": {"QComboBox"},
    "activated(int)": {"QComboBox"},
    "valueChanged(int)": {"QSpinBox"}, "currentNodeChanged(vtkMRMLNode*)": {"qMRMLNodeComboBox"},
    "currentPathChanged(QString)": {"ctkPathLineEdit"}, "itemChanged(QListWidgetItem*)": {"QListWidget"},
    "cellClicked(int,int)": {"QTableWidget"}, "checkedNodesChanged()": {"qMRMLCheckableNodeComboBox"},
}
KNOWN_CUSTOM_WIDGETS = {  # Slicer and CTK widget classes a scripted module's .ui may use
    "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLSegmentsTableView", "qMRMLSegmentSelectorWidget",
    "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLSegmentationShow3DButton", "qMRMLCheckableNodeComboBox",
    "ctkCollapsibleButton", "ctkCollapsibleGroupBox", "ctkPathLineEdit", "ctkDirectoryButton", "ctkSliderWidget",
    "ctkRangeWidget", "ctkMenuButton", "ctkCheckBox", "ctkComboBox", "ctkFittedTextBrowser", "ctkDoubleSpinBox",
}


# --- helpers -----------------------------------------------------------------------------------------


def ui_widgets() -> dict[str, str]:
    """Widget name -> class, from the .ui (names must be unique)."""
    names: dict[str, str] = {}
    for w in ET.parse(UI_FILE).getroot().iter("widget"):
        assert w.get("name") not in names, f"widget name {w.get('name')} appears twice in the .ui"
        names[w.get("name")] = w.get("class")
    return names


def expected_class(name: str) -> str:
    return next(cls for suffix, cls in SUFFIX_CLASSES if name.lower().endswith(suffix.lower()))


def module_tree(path: Path = MODULE_FILE) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def ui_attribute_uses(tree: ast.Module) -> list[tuple[str, str]]:
    """(widget, attribute) for every ``self.ui.W.attr``, also through a local alias ``x = self.ui.W``."""
    def widget_of(node) -> str | None:
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            return node.attr
        return None

    uses = []
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        aliases = {t.id: widget_of(a.value) for a in ast.walk(function) if isinstance(a, ast.Assign)
                   for t in a.targets if isinstance(t, ast.Name) and widget_of(a.value)}
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute):
                widget = widget_of(node.value) or (aliases.get(node.value.id) if isinstance(node.value, ast.Name)
                                                   else None)
                if widget:
                    uses.append((widget, node.attr))
    return uses


def module_constant(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{MODULE_FILE.name} defines no constant {name}")


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...) in the CMake file"
    return match.group(1).split()


def cmake_value(text: str, variable: str) -> str:
    match = re.search(rf'set\(\s*{variable}\s+"([^"]*)"\s*\)', text)
    assert match, f"no set({variable} \"...\") in the top-level CMakeLists.txt"
    return match.group(1)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


# --- the module file -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [MODULE_FILE, *sorted(PANEL.glob("*.py")), *sorted(EFFECT.glob("*.py"))],
                         ids=lambda p: p.name)
def test_module_files_compile_for_python_311_and_parse(tmp_path, path):
    source = path.read_text(encoding="utf-8")
    ast.parse(source, feature_version=(3, 11))
    py_compile.compile(str(path), cfile=str(tmp_path / "module.pyc"), doraise=True)


def test_the_module_defines_its_widget_and_imports_its_logic_and_self_test():
    tree = module_tree()
    names = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"SAM2FewShot", "SAM2FewShotWidget"} <= names
    imported = {a.name for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(
        "SAM2FewShotPanel") for a in n.names}
    assert {"SAM2FewShotLogic", "SAM2FewShotTest"} <= imported  # Slicer looks them up in the module's namespace


def test_module_file_stays_small():
    for path in [MODULE_FILE, *PANEL.glob("*.py"), *EFFECT.glob("*.py")]:
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 500, path.name


def test_every_widget_the_code_uses_exists_with_the_expected_class():
    widgets, used = ui_widgets(), set()
    for tree in map(module_tree, WIRING_FILES):
        used |= {w for w, _ in ui_attribute_uses(tree)}
        used |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and WIDGET_NAME.match(n.value)}
    assert len(used) >= 35  # the whole panel is checked, not a handful
    missing = sorted(used - set(widgets))
    assert not missing, f"the code uses widgets the .ui lacks: {missing}"
    wrong = {n: (widgets[n], expected_class(n)) for n in used if widgets[n] != expected_class(n)}
    assert not wrong, f"widgets with another class than their name says (has, expected): {wrong}"


def test_the_code_uses_only_attributes_its_widgets_have():
    widgets = ui_widgets()
    bad = sorted({(w, a) for tree in map(module_tree, WIRING_FILES) for w, a in ui_attribute_uses(tree)
                  if a not in COMMON | API[widgets[w]]})
    assert not bad, f"attributes used on widgets whose class lacks them: {bad}"


def parameter_annotations() -> dict[str, str]:
    """Parameter name -> its annotation's source, from the @parameterNodeWrapper class in logic.py."""
    for node in module_tree(LOGIC_FILE).body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {a.target.id: ast.unparse(a.annotation) for a in node.body if isinstance(a, ast.AnnAssign)}
    raise AssertionError("logic.py has no @parameterNodeWrapper class")


def test_bound_widgets_are_parameters_of_a_type_slicer_510_can_connect():
    """connectGui (Slicer 5.10's guiConnectors.py) matches widget classes exactly and needs a Choice
    for a combo box of strings and bounds for a spin box, else it raises when the panel opens."""
    root, parameters = ET.parse(UI_FILE).getroot(), parameter_annotations()
    bound = {w.get("name"): (w.get("class"), w.findtext("property[@name='SlicerParameterName']/string"))
             for w in root.iter("widget") if w.find("property[@name='SlicerParameterName']") is not None}
    assert len(bound) >= 15
    for name, (cls, parameter) in bound.items():
        assert parameter in parameters, f"{name} is bound to '{parameter}', which the parameter node lacks"
        annotation = parameters[parameter]
        ok = {"qMRMLNodeComboBox": annotation.startswith("vtkMRML"),
              "QComboBox": "Choice(" in annotation or annotation == "MethodChoice",
              "QSpinBox": annotation.startswith("Annotated[int, WithinRange("),
              "QCheckBox": annotation == "bool"}.get(cls, False)
        assert ok, f"{name} ({cls}) cannot be connected to {parameter}: {annotation}"
    unbound = {"supportFromLibrary", "libraryFolder", "normalization", "excludedSegments",
               "promptBoxes"}  # set by hand: 5.10 connects no checkable node combo box
    assert set(parameters) == {p for _, p in bound.values()} | unbound
    widgets = ui_widgets()
    calls = [n for tree in map(module_tree, WIRING_FILES) for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    for call in calls:
        target = call.func.value
        if call.func.attr == "connect" and isinstance(target, ast.Attribute) \
                and isinstance(target.value, ast.Attribute) and target.value.attr == "ui":
            signal = call.args[0].value
            assert widgets[target.attr] in SIGNALS[signal], f"{target.attr} ({widgets[target.attr]}) has no {signal}"


# --- the panel ------------------------------------------------------------------------------------


def test_ui_is_well_formed_and_uses_known_slicer_and_ctk_widgets():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.findtext("class") == "SAM2FewShot"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SAM2FewShot"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    assert custom <= KNOWN_CUSTOM_WIDGETS, f"unknown custom widgets: {custom - KNOWN_CUSTOM_WIDGETS}"
    widgets = ui_widgets()
    undeclared = {c for c in widgets.values() if not c.startswith("Q") and c not in custom}
    assert not undeclared, f"widget classes neither Qt's nor declared as custom widgets: {undeclared}"
    sections = [w.findtext("property[@name='text']/string") for w in top.iter("widget")
                if w.get("class") == "ctkCollapsibleButton" and w.get("name") != "advancedCollapsibleButton"]
    assert sections == ["Query", "Support", "Method", "Run", "Results", "Refine", "Review a cohort"]


def test_every_node_selector_gets_the_scene():
    root = ET.parse(UI_FILE).getroot()
    fed = {c.findtext("receiver") for c in root.iter("connection")
           if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
           and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {n for n, c in ui_widgets().items() if c in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox")}
    assert selectors and selectors == fed, f"node selectors without a scene: {selectors - fed}"
    for widget in root.iter("widget"):
        if widget.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox"):
            types = [s.text for s in widget.findall("property[@name='nodeTypes']/stringlist/string")]
            assert types in (["vtkMRMLScalarVolumeNode"], ["vtkMRMLSegmentationNode"], ["vtkMRMLMarkupsFiducialNode"],
                             ["vtkMRMLMarkupsROINode"]), (widget.get("name"), types)


# --- packaging -------------------------------------------------------------------------------------


def test_module_cmakelists_names_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    listed = {p.replace("${MODULE_NAME}", name) for p in cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    scripts = {"SAM2FewShot.py"} | {str(p.relative_to(MODULE_DIR)) for d in (ENGINE, PANEL, EFFECT)
                                    for p in d.rglob("*.py")}
    block = "\n".join(f"  {p.replace('SAM2FewShot', '${MODULE_NAME}', 1)}" for p in sorted(scripts))
    assert listed == scripts, (f"missing from CMakeLists: {sorted(scripts - listed)}; listed but absent: "
                               f"{sorted(listed - scripts)}. The list to paste:\n{block}")
    resources = {p.replace("${MODULE_NAME}", name) for p in cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert resources == on_disk
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_top_level_cmakelists_carries_the_extension_metadata():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert cmake_value(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert "PyTorch" in cmake_value(text, "EXTENSION_DEPENDS").split()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert cmake_value(text, variable).startswith("https://")
    assert len(cmake_value(text, "EXTENSION_DESCRIPTION")) > 40 and cmake_value(text, "EXTENSION_CONTRIBUTORS")
    assert cmake_value(text, "EXTENSION_ICONURL").endswith("Resources/Icons/SAM2FewShot.png")
    assert "find_package(Slicer REQUIRED)" in text and "add_subdirectory(SAM2FewShot)" in text


def test_icons_are_128_pixel_pngs_and_the_same_picture():
    module_icon, extension_icon = (MODULE_DIR / "Resources/Icons/SAM2FewShot.png",
                                   ROOT / "Resources/Icons/SAM2FewShot.png")
    assert png_size(module_icon) == (128, 128) == png_size(extension_icon)
    assert module_icon.read_bytes() == extension_icon.read_bytes()


# --- the engine stays free of Qt -------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", sorted(ENGINE.rglob("*.py")), ids=lambda p: str(p.relative_to(ENGINE)))
def test_engine_never_imports_qt_ctk_or_slicer_gui(path):
    gui = {m for m in imported_modules(path) if m.split(".")[0] in {"qt", "ctk", "PythonQt", "PyQt5", "PySide2"}
           or m.startswith(("slicer.util", "slicer.ScriptedLoadableModule", "slicer.app"))}
    assert not gui, f"{path.name} imports GUI modules: {gui}"
    if str(path.relative_to(ENGINE)) not in BRIDGE_FILES:
        slicer = {m for m in imported_modules(path) if m.split(".")[0] in {"slicer", "vtk", "vtkmodules"}}
        assert not slicer, f"{path.name} imports Slicer/VTK; only the MRML bridge may: {slicer}"


def test_panel_helpers_import_neither_torch_nor_qt():
    """What the module and its Logic import must load in a Slicer without torch, and never bring torch
    (or a CUDA context) into Slicer's own process: the worker reports GPU memory instead."""
    import importlib.util

    imports = [n for path in [MODULE_FILE, *PANEL.glob("*.py")] for n in ast.walk(module_tree(path))
               if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("SAM2FewShotLib")]
    names = {n.module for n in imports} | {f"{n.module}.{a.name}" for n in imports for a in n.names}
    def is_module(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a function or class of a module, not a submodule
            return False

    modules = sorted(m for m in names if is_module(m))
    assert "SAM2FewShotLib.slicer.panel" in modules
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted(m for m in ('torch', 'sam2', 'qt', 'slicer', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_every_engine_name_the_module_uses_exists():
    """The module cannot run here: every engine module, name and module attribute it uses must exist."""
    checked = 0
    for tree in (module_tree(), *(module_tree(p) for p in PANEL.glob("*.py"))):
        checked += _check_engine_names(tree)
    assert checked >= 12


def _check_engine_names(tree: ast.Module) -> int:
    import importlib
    import types

    used = {(n.value.id, n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    checked = 0
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("SAM2FewShotLib"):
            package = importlib.import_module(node.module)
            for alias in node.names:
                value = getattr(package, alias.name, None)
                if value is None:
                    value = importlib.import_module(f"{node.module}.{alias.name}")  # a submodule
                local = alias.asname or alias.name
                if isinstance(value, types.ModuleType):
                    missing = sorted(attr for name, attr in used if name == local and not hasattr(value, attr))
                    assert not missing, f"{node.module}.{alias.name} has no {missing}"
                checked += 1
    return checked


def test_the_worker_is_started_with_the_folder_that_holds_the_engine():
    """The Logic lives in SAM2FewShotPanel/: the worker's PYTHONPATH must be the module folder above it."""
    import os

    assignment = next(n for n in module_tree(LOGIC_FILE).body if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == "MODULE_FOLDER" for t in n.targets))
    folder = eval(compile(ast.Expression(assignment.value), str(LOGIC_FILE), "eval"),  # noqa: S307 - our own code
                  {"os": os, "__file__": str(LOGIC_FILE)})
    assert (Path(folder) / "SAM2FewShotLib" / "run" / "worker.py").is_file()
    assert "pythonpath=[MODULE_FOLDER]" in LOGIC_FILE.read_text(encoding="utf-8")
    assert 'environment[RESERVED_CORES_ENV] = "1"' in LOGIC_FILE.read_text(encoding="utf-8")  # a core for Slicer
