"""Fixtures shared by the trainer tests."""
import pytest

from tests.support.demo_runs import trained_tokenizer_file


@pytest.fixture(scope="module")
def tokenizer_file(demo, tmp_path_factory):
    """A tokenizer trained once on the module's `demo` dataset (each test module that
    uses it defines its own `demo` fixture)."""
    return trained_tokenizer_file(demo, tmp_path_factory)
