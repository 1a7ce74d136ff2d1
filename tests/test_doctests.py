"""The examples in the library's docstrings run and hold (they document pure helpers)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import siren_batch

MODULES = sorted(m.name for m in pkgutil.walk_packages(siren_batch.__path__, "siren_batch."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:      # vllm lives in its own virtualenv (make test-vllm)
        pytest.skip(f"{name} does not import here: {err}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
