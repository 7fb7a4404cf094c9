"""The ``direct`` fixture: the float64 hand computation of a mixer (see backbone_refs.py)."""
import pytest
from backbone_refs import mixer_direct


@pytest.fixture
def direct():
    return mixer_direct
