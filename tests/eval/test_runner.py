"""run_eval's argument checks, before any model or data is touched."""

from __future__ import annotations

import pytest

from waldo.eval.runner import run_eval


def test_an_unknown_protocol_is_named_as_such_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown protocol 'nope'; known: .*grocery-open-cross"):
        run_eval(protocol="nope", progress=False)
