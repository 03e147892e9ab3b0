"""Static checks of the Extensions Index entry (SAM2FewShot.json) against the extension's CMake metadata.

The Index builds the extension from the entry and lists it with the CMake metadata; its pull-request
checks (Slicer/ExtensionsIndex scripts/check_description_files.py) and "New extension" template want
the two consistent: the file named after project(), the schema Slicer 5.10 ships (v1.0.1, no extra
fields), build_dependencies as EXTENSION_DEPENDS, a repository named Slicer*, icon and screenshots as
raw files of that repository. The screenshot must be the file the self-test writes, and the values
only a person can give stay marked placeholders that the README's Publishing section lists exactly.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_slicer_module_static import PANEL, ROOT, cmake_value, png_size  # noqa: E402 - helpers only

CATALOG = ROOT / "SAM2FewShot.json"
SELFTEST = PANEL / "selftest.py"
README = ROOT / "README.md"
# Slicer 5.10 (tag v5.10.0) ships Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: its $id, its
# properties (additionalProperties is false) and its required ones; CMake's
# slicerFunctionExtractExtensionDescriptionFromJson also requires scm_revision.
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
SCHEMA_FIELDS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                 "build_subdirectory", "enabled", "tier"}
REQUIRED_FIELDS = {"$schema", "category", "scm_url", "scm_revision"}
PLACEHOLDER = re.compile(r"PLACEHOLDER(?:-[A-Z]+)+")
# Where a placeholder can hide: the files the Index and the extension build read.
PLACEHOLDER_SUFFIXES = {".txt", ".json", ".py", ".ui", ".toml", ".cfg", ".sh"}


def catalog() -> dict:
    return json.loads(CATALOG.read_text(encoding="utf-8"))


def cmake_text() -> str:
    return (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def repository(url: str) -> tuple[str, str]:
    """(owner, name) of a github.com repository URL, as the Index reads it (a trailing .git dropped)."""
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.netloc == "github.com", url
    owner, name = parts.path.strip("/").split("/")
    return owner, name.removesuffix(".git")


def raw_path(url: str, owner: str, name: str, revision: str) -> str:
    """The repository path a raw.githubusercontent.com URL serves, checked to be of that repository and revision."""
    prefix = f"https://raw.githubusercontent.com/{owner}/{name}/{revision}/"
    assert url.startswith(prefix), f"{url} is not a raw file of {owner}/{name} at {revision}"
    return url[len(prefix):]


def selftest_constants() -> dict[str, str]:
    """The self-test's module-level string constants (it imports slicer, so it is read, not imported)."""
    tree = ast.parse(SELFTEST.read_text(encoding="utf-8"))
    return {node.targets[0].id: node.value.value for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def publishing_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Publishing\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Publishing' section"
    return match.group(1)


def listed_to_supply() -> set[str]:
    """The Publishing section's list of what a person must still supply: '- `item` — why'."""
    return set(re.findall(r"^- `([^`]+)` — \S", publishing_section(), re.M))


def placeholders_left() -> set[str]:
    """Every placeholder token in the files the Index and the build read (the README only lists them)."""
    files = [*ROOT.glob("*"), *(ROOT / "SAM2FewShot").rglob("*")]
    found = set()
    for path in files:
        if path.is_file() and path.suffix in PLACEHOLDER_SUFFIXES:
            found |= set(PLACEHOLDER.findall(path.read_text(encoding="utf-8", errors="replace")))
    return found


def screenshot_paths() -> list[str]:
    entry, text = catalog(), cmake_text()
    owner, name = repository(entry["scm_url"])
    return [raw_path(url, owner, name, entry["scm_revision"])
            for url in cmake_value(text, "EXTENSION_SCREENSHOTURLS").split()]


def test_catalog_entry_is_a_slicer_510_schema_entry_named_after_the_project():
    raw = CATALOG.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n"), "the Index wants LF-only line endings"
    entry = catalog()
    assert entry["$schema"] == SCHEMA_URL
    assert REQUIRED_FIELDS <= set(entry) <= SCHEMA_FIELDS, sorted(set(entry) ^ SCHEMA_FIELDS)
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry["build_subdirectory"] == "."  # not a superbuild: the top-level CMakeLists.txt builds it
    assert all(isinstance(d, str) and d for d in entry["build_dependencies"])
    project = re.search(r"^project\(\s*(\w+)", cmake_text(), re.M).group(1)
    assert CATALOG.stem == project == "SAM2FewShot"


def test_catalog_entry_matches_the_cmake_metadata():
    entry, text = catalog(), cmake_text()
    assert entry["category"] == cmake_value(text, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_value(text, "EXTENSION_DEPENDS").split()
    assert repository(entry["scm_url"]) == repository(cmake_value(text, "EXTENSION_HOMEPAGE"))
    _, name = repository(entry["scm_url"])
    assert name.startswith("Slicer") and not CATALOG.stem.startswith("Slicer")  # the Index's naming rule


def test_icon_url_is_the_icon_file_of_that_repository_at_scm_revision():
    entry = catalog()
    owner, name = repository(entry["scm_url"])
    path = raw_path(cmake_value(cmake_text(), "EXTENSION_ICONURL"), owner, name, entry["scm_revision"])
    assert png_size(ROOT / path) == (128, 128)


def test_screenshot_url_is_the_file_the_self_test_writes():
    constants = selftest_constants()
    assert screenshot_paths() == [f"Screenshots/{constants['SCREENSHOT_FILE']}"]
    selftest = SELFTEST.read_text(encoding="utf-8")
    assert re.search(r"^    def test_panel_click_path\(self\):.*?^        save_screenshot\(", selftest, re.S | re.M), \
        "the self-test's click path must capture the screenshot after its run"
    assert constants["SCREENSHOTS_ENV"] in publishing_section()
    for path in screenshot_paths():
        if (ROOT / path).exists():  # once committed: a real capture of the main window, not a thumbnail
            width, height = png_size(ROOT / path)
            assert width >= 800 and height >= 500, (path, width, height)


def test_placeholders_left_are_exactly_those_the_publishing_section_lists():
    missing = {path for path in screenshot_paths() if not (ROOT / path).exists()}
    assert listed_to_supply() == placeholders_left() | missing
