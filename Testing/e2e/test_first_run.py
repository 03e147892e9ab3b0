"""The first ten minutes, as a newcomer meets them: the README's promise, the demo offline, setup,
help and progress. Real subprocesses, the real CLI, the shared MSD hippocampus cases."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from phantoms import REPO
from SAM2FewShotLib.cli.console import ConsoleProgress
from SAM2FewShotLib.cli.main import build_parser, main
from SAM2FewShotLib.io import example_data
from SAM2FewShotLib.io.example_data import DEMO_QUERY, DEMO_SUPPORT

ROOT = REPO
RANDOM = ["--random-weights", "--image-size", "128", "--device", "cpu", "-q"]


def test_the_readme_names_the_pair_the_demo_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    said = re.search(r"segments case `(hippocampus_\d+)` from the labelled case\s+`(hippocampus_\d+)`", readme)
    assert said, "the README says which example the quickstart segments"
    args = build_parser().parse_args(["demo"])
    assert said.groups() == (DEMO_QUERY, DEMO_SUPPORT) == (args.query_case, args.support_case)


def test_the_demo_names_the_structures_and_announces_every_file(shared_data, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--data", str(shared_data / "msd_hippocampus"), "--out", str(out), "--method",
                 "registration", "-q"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / f"{DEMO_QUERY}_from_{DEMO_SUPPORT}_report.json").read_text())
    assert set(report["demo"]["dice"]) == {"anterior hippocampus", "posterior hippocampus"}
    assert [s["name"] for s in report["segments"]] == ["anterior hippocampus", "posterior hippocampus"]
    assert "anterior hippocampus" in printed.out and "label_1" not in printed.out
    assert f"{out / DEMO_QUERY}_from_{DEMO_SUPPORT}.seg.nrrd (labels, names and colours)" in printed.out
    assert f"the report {out / DEMO_QUERY}_from_{DEMO_SUPPORT}_report.json" in printed.out
    assert report["demo"]["dice"]["anterior hippocampus"] > 0.3  # registration needs no weights: a real result


def _run_demo(argv, tmp_path, **env):
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "SAM2FEWSHOT_CACHE": str(tmp_path / "empty_cache"), **env}
    return subprocess.run([sys.executable, "-m", "SAM2FewShotLib.cli", "demo", *argv], capture_output=True, text=True,
                          env=environ, timeout=300)


def test_offline_without_weights_one_message_says_what_works_and_no_folder_is_left(shared_data, tmp_path):
    out = tmp_path / "out" / "demo"
    run = _run_demo(["--data", str(shared_data / "msd_hippocampus"), "--out", str(out), "--device", "cpu", "-q"],
                    tmp_path, SAM2FEWSHOT_COMMAND="./quickstart.sh")
    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("sam2fewshot: error: weights for sam2.1-tiny are not in the cache")
    for advice in ("./quickstart.sh --data", "--checkpoint FILE", "--random-weights", "--method registration"):
        assert advice in line, advice
    assert not (tmp_path / "out").exists(), "a failed demo leaves no output folder"


def test_without_data_and_weights_the_one_message_says_both(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(example_data, "MSD_HIPPOCAMPUS_URL", "http://127.0.0.1:9/Task04_Hippocampus.tar")  # closed
    monkeypatch.setenv("SAM2FEWSHOT_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sam2fewshot: error: cannot download the example data")
    for advice in ("--data FOLDER", "no weights are cached either", "--random-weights", "--method registration"):
        assert advice in err, advice
    assert not (tmp_path / "demo").exists()


def test_the_demo_with_random_weights_runs_end_to_end(shared_data, tmp_path):
    run = _run_demo(["--data", str(shared_data / "msd_hippocampus"), "--out", str(tmp_path / "d"), "--scheme",
                     "pair", *RANDOM], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "anterior hippocampus" in run.stdout and "random (seeded)" in run.stdout


# --- help -----------------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, name: str = "sam2fewshot"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def test_every_option_has_a_meaning_and_shows_its_default():
    checked = 0
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                shown = parser._get_formatter()._get_help_string(action)
                assert "(default:" in shown or "%(default)" in shown or "default" in action.help.lower(), \
                    f"{name} {action.option_strings[0]} does not show its default"
            checked += 1
    assert checked > 80
    segment = " ".join(dict(_parsers(build_parser()))["sam2fewshot segment"].format_help().split())
    assert "multiple of 64, at least 128" in segment  # the image-size rule, before any error
    for group in ("propagate (", "matched support (", "retrieval (", "guided (", "registration ("):
        assert f" {group}" in segment, group
    assert "--axis {auto,axial,coronal,sagittal}" in segment and "(default: auto)" in segment
    library = " ".join(dict(_parsers(build_parser()))["sam2fewshot library build"].format_help().split())
    assert "--plane {auto," in library and "(default: auto)" in library


def test_help_imports_neither_torch_nor_sam2_nor_simpleitk():
    code = ("import sys, contextlib, io\n"
            "from SAM2FewShotLib.cli.main import main\n"
            "for argv in (['--help'], ['segment', '--help'], ['bench', '--help'], ['library', 'build', '--help'], "
            "['demo', '--help'], ['models', 'list', '--help'], ['batch', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'sam2', 'SimpleITK', 'hydra') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_a_bad_option_is_one_line():
    run = subprocess.run([sys.executable, "-m", "SAM2FewShotLib.cli", "segment", "--query", "q.nii.gz", "--out",
                          "o.nii.gz", "--scheme", "teleport"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("sam2fewshot: error: argument --scheme: invalid choice") and "--help" in line


# --- progress -------------------------------------------------------------------------------------


def test_progress_bars_say_what_they_count_once_each(capsys):
    progress = ConsoleProgress(min_interval=0)  # every update drawn: a second final line would show
    for done in range(0, 29, 4):
        progress("encode query", min(done, 28), 28)
    for done in (1, 2, 3):
        progress("register support 2/4", done, 3)
    progress("propagate forward", 5, 10)  # the first count arrives late: no absurd rate, one bar
    progress.close()
    err = capsys.readouterr().err
    finals = [line for line in re.split(r"[\r\n]", err) if "100%" in line]
    assert [line.split(":")[0] for line in finals] == ["encode query", "register support 2/4"]  # once each
    assert "28/28 slices" in finals[0] and "3/3 steps" in finals[1]
    assert "propagate forward:  50%" in err and "5/10 slices" in err and "/s" not in err
    assert "<" in finals[0]  # elapsed<remaining: an ETA


def test_a_ctrl_c_while_a_bar_draws_itself_leaves_the_next_line_whole(capsys, monkeypatch):
    from SAM2FewShotLib.cli import console

    def drawn_then_interrupted(*args, **kwargs):  # tqdm draws its first line in its constructor
        sys.stderr.write("propagate forward:   5%|  | 1/20 slices [00:00<?]")
        raise KeyboardInterrupt

    monkeypatch.setattr(console, "tqdm", drawn_then_interrupted)
    progress = ConsoleProgress(min_interval=0)
    with pytest.raises(KeyboardInterrupt):
        progress("propagate forward", 1, 20)
    progress.close()
    print("sam2fewshot: interrupted", file=sys.stderr)
    assert capsys.readouterr().err.splitlines()[-1] == "sam2fewshot: interrupted"


def test_engine_stages_name_what_they_do(shared_data, tmp_path):
    from SAM2FewShotLib.run.request import Request
    from SAM2FewShotLib.run.runner import Runner
    from SAM2FewShotLib.sam2.build import ModelOptions

    folder = shared_data / "msd_hippocampus"
    stages: dict[str, set] = {}
    request = Request(method="matched-support", query=folder / f"{DEMO_QUERY}_img.nii.gz",
                      supports=((folder / f"{DEMO_SUPPORT}_img.nii.gz", folder / f"{DEMO_SUPPORT}_label.nii.gz"),),
                      model=ModelOptions(random_weights=True, image_size=128, device="cpu"),
                      params={"augmentations": 1, "slices_per_structure": 2, "scheme": "video+memory"})
    labels, report = Runner().run(request, lambda stage, done, total: stages.setdefault(stage, set()).add(total))
    n = report["session"]["num_slices"]
    assert stages["encode query"] == {n} and stages["encode supports"] == {4}  # 2 structures x 2 slices x 1
    assert stages["propagate forward"] == {n} and stages["propagate backward"] == {n}  # each pass counts its own
    assert set(stages) == {"model", "encode query", "encode supports", "propagate forward", "propagate backward"}


# --- setup and the test suite's own footprint -----------------------------------------------------


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(), reason="runs in the project's .venv only")
def test_setup_says_no_alarming_line_and_a_second_run_installs_nothing():
    first = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    second = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    for run in (first, second):
        assert run.returncode == 0, run.stderr[-2000:]
        assert not [line for line in (run.stdout + run.stderr).splitlines()
                    if line.startswith("ERROR") or "requires torchvision" in line]
    assert second.stdout.strip() == "environment ready (.venv unchanged since its setup)"


def test_temporary_folders_of_passing_tests_are_removed(pytestconfig):
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
