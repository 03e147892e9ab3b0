"""Names from data as file names: safe ones unchanged, the rest escaped, collisions refused."""

from __future__ import annotations

import pytest

from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.common.names import MAX_NAME_BYTES, check_distinct, file_name


@pytest.mark.parametrize("name", ["case_001", "hippocampus_015", "Patient 7 (T1)", "été-04", "a%b", "x.y", "-1"])
def test_a_safe_name_maps_to_itself_so_existing_cohorts_resume(name):
    assert file_name(name) == name


@pytest.mark.parametrize("name, expected", [
    ("../escaped_x", "%2E.%2Fescaped_x"), ("/abs/x", "%2Fabs%2Fx"), ("C:\\x", "C%3A%5Cx"), ("..", "%2E%2E"),
    (".", "%2E"), (".hidden", "%2Ehidden"), ("a.", "a%2E"), ("a ", "a%20"), ("a\tb\n", "a%09b%0A"),
    ("CON", "%43ON"), ("nul.txt", "%6Eul.txt"), ("COM1", "%43OM1"), ("a/%b", "a%2F%25b")])
def test_separators_dots_controls_and_reserved_names_are_escaped(name, expected):
    assert file_name(name) == expected
    assert "/" not in expected and "\\" not in expected


def test_an_over_long_name_is_shortened_with_a_digest_of_the_whole():
    first, second = "x" * 300 + "1", "x" * 300 + "2"
    assert len(file_name(first).encode()) <= MAX_NAME_BYTES
    assert file_name(first) != file_name(second)
    assert len(file_name("é" * 200).encode()) <= MAX_NAME_BYTES  # counted in bytes, cut between characters


@pytest.mark.parametrize("name", ["", "   ", "a\udcffb"])
def test_empty_and_undecodable_names_are_refused_in_one_line(name):
    with pytest.raises(InputError) as error:
        file_name(name)
    assert "\n" not in str(error.value)


def test_two_owners_of_one_file_are_refused_naming_both_even_when_only_the_case_differs():
    with pytest.raises(InputError, match="case case_a would write case_a.nii.gz, which is also written by case Case_A"):
        check_distinct({"Case_A": ["Case_A.nii.gz"], "case_a": ["case_a.nii.gz"]})
    with pytest.raises(InputError, match="which is also the folder's own manifest.json"):
        check_distinct({"manifest": ["manifest.nii.gz", "manifest.json"]}, reserved=["manifest.json"])
    check_distinct({"a": ["a.nii.gz", "a.json"], "b": ["b.nii.gz", "b.json"]}, reserved=["manifest.json"])
