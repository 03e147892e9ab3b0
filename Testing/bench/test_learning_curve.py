"""`bench --learning-curve`: Dice as the labelled set grows, on small phantoms with registration (no model)."""

import csv
import math

import pytest

from phantoms import phantom
from SAM2FewShotLib.bench.learning_curve import OVERALL, summarize_curve, support_orders
from SAM2FewShotLib.bench.learning_curve import RUNS_CSV as RUNS
from SAM2FewShotLib.cli.main import EXIT_ERROR
from SAM2FewShotLib.cli.main import main as cli_main
from SAM2FewShotLib.io.volume_io import write_labels, write_volume

N_CASES = 3  # k = 1, 2: small enough for CI, and the full set still comes up in every order


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three phantom cases of two structures, shifted and resized a little from one to the next."""
    folder = tmp_path_factory.mktemp("curve_data")
    for n in range(N_CASES):
        image, labels = phantom(shape_kji=(8, 28 + 2 * n, 30), spacing=(1.0, 1.0, 2.0), origin=(n, -n, 0.0), seed=n)
        write_volume(image, folder / f"case{n}_img.nii.gz")
        write_labels(labels, folder / f"case{n}_label.nii.gz")
    return folder


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_learning_curve_on_phantoms_with_registration(data, tmp_path, capsys):
    argv = ["-q", "bench", "--learning-curve", "--data", str(data), "--method", "registration", "--orders", "2",
            "--seed", "3", "--out"]
    assert cli_main([*argv, str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| registration |")]
    assert [int(line.split("|")[2]) for line in table] == list(range(1, N_CASES))  # k = 1 .. N-1
    assert out.splitlines()[0] == f"| method | k | structure_1 | structure_2 | {OVERALL} | runs | failed |"
    assert all(line.rstrip(" |").endswith(f"| {N_CASES * 2} | 0") for line in table)  # queries x orders, none failed

    summary = _rows(tmp_path / "a" / "learning_curve.csv")
    assert [(r["k"], r["structure"]) for r in summary] == [
        (str(k), s) for k in range(1, N_CASES) for s in ("structure_1", "structure_2", OVERALL)]
    assert all(0.0 <= float(r["mean"]) <= 1.0 and int(r["n"]) == N_CASES * 2 for r in summary)
    runs = _rows(tmp_path / "a" / RUNS)
    assert len(runs) == N_CASES * 2 * (N_CASES - 1) * 3  # queries x orders x k x (structures + overall)
    for r in runs:
        chosen = r["supports"].split(";")
        assert len(chosen) == int(r["k"]) and r["case"] not in chosen
    last = str(N_CASES - 1)
    full = {r["dice"] for r in runs if r["case"] == "case0" and r["k"] == last and r["structure"] == OVERALL}
    assert len(full) == 1  # the full set is the same run in every order
    assert (tmp_path / "a" / "learning_curve.json").is_file()

    assert cli_main([*argv, str(tmp_path / "b")]) == 0  # the same seed: the same orders and numbers
    capsys.readouterr()
    untimed = [{k: v for k, v in r.items() if k != "method_s"} for r in runs]
    assert [{k: v for k, v in r.items() if k != "method_s"} for r in _rows(tmp_path / "b" / RUNS)] == untimed
    assert _rows(tmp_path / "b" / "learning_curve.csv") == summary


def test_orders_are_seeded_per_query():
    pool = ["a", "b", "c", "d"]
    assert support_orders(pool, 3, seed=1, query_index=0) == support_orders(pool, 3, seed=1, query_index=0)
    assert support_orders(pool, 5, seed=1, query_index=0) != support_orders(pool, 5, seed=2, query_index=0)
    assert all(sorted(o) == pool for o in support_orders(pool, 4, seed=0, query_index=2))


def test_summary_is_mean_and_sd_over_queries_and_orders_without_failed_runs():
    def run(case, k, dice, status="ok"):
        return {"method": "m", "case": case, "order": 0, "k": k, "status": status,
                "dice": {"s": dice, OVERALL: dice} if status == "ok" else {}}

    rows = summarize_curve([run("a", 1, 0.2), run("b", 1, 0.4), run("c", 1, None, "error"), run("a", 2, 0.5)])
    first = next(r for r in rows if r["k"] == 1 and r["structure"] == "s")
    assert math.isclose(first["mean"], 0.3) and math.isclose(first["sd"], math.sqrt(0.02))
    assert (first["n"], first["failed"]) == (2, 1)


@pytest.mark.parametrize("extra, message", [([], "needs --method"), (["--method", "propagate"], "no learning curve"),
                                            (["--method", "registration", "--orders", "0"], "at least 1"),
                                            (["--method", "registration", "--support", "case0"], "--support")])
def test_refusals_before_any_work(data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert cli_main(["-q", "bench", "--learning-curve", "--data", str(data), "--out", str(out), *extra]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
