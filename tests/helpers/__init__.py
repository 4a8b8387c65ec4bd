"""Helpers shared by the tests (imported as `helpers.<module>`; tests/ is on sys.path through pytest's
rootdir conftest). Test files import from here and from sgl_ascend only, never from each other or
from conftest.py, which holds fixtures only (enforced by tests/test_test_layout.py)."""
