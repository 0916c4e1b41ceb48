"""The errors users fix survive pickling: a rank's error reaches its launcher that way, and is
raised there as itself (`parallel.launch`)."""

from __future__ import annotations

import inspect
import pickle

import pytest

import longvita.errors as errors

ERROR_CLASSES = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, Exception) and cls.__module__ == errors.__name__
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_round_trips_through_pickle(cls):
    error = cls("what to fix")
    if cls is errors.PositionsError:
        error = cls("what to fix", prompt_tokens=40, positions=32)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls and str(copy) == "what to fix"
    assert vars(copy) == vars(error)
