"""Fixtures of the end-to-end tests."""

import pytest

from matrix_inputs import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The bad-input matrix's inputs (matrix_inputs.py), once per test module."""
    return make_world(tmp_path_factory.mktemp("matrix"))
