"""The pass reference is generated from the declarations; this fails when it drifts."""

from tools.docs import OUT, render


def test_pass_reference_is_current():
    assert OUT.read_text() == render(), "regenerate it: python -m tools.docs"
