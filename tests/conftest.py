import pytest

from moescope.arch import families
from moescope.testing import build_checkpoint

FAMILY_REFERENCES = [(f.name, ref) for f in families().values() for ref in f.reference_configs]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Build (once per session) a tiny checkpoint: tiny(family, reference=None, **kw) -> BuiltCheckpoint."""
    cache = {}

    def make(family, reference=None, **kw):
        key = (family, reference, repr(sorted(kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[key] = build_checkpoint(family, path, reference=reference, **kw)
        return cache[key]

    return make
