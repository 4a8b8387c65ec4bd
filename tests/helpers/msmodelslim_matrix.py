"""The msModelSlim conformance matrix (scripts/msmodelslim_matrix.py) seen from the tests.

The script owns the entries and what each is expected to do; this module loads it, builds (or reuses from
its cache) the subset the tests run, and checks one output the way a user would: `inspect`, then `verify`
against the base model it was quantized from.

SGL_ASCEND_MSMODELSLIM_MATRIX=full runs every entry (default: the `ci` subset; or a comma-separated list
of entry names).
"""

import importlib.util
import os
from typing import Dict, Optional

from sgl_ascend.tools.plan import plan_checkpoint
from sgl_ascend.tools.verify import verify_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "msmodelslim_matrix.py")
DOCS = os.path.join(ROOT, "docs", "conformance.md")
# verify's defaults (sgl-ascend verify --threshold / --min-top1)
THRESHOLD, MIN_TOP1 = 0.25, 0.8


def _load_script():
    spec = importlib.util.spec_from_file_location("msmodelslim_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


matrix = _load_script()


def selected():
    """The entries under test (SGL_ASCEND_MSMODELSLIM_MATRIX)."""
    chosen = os.environ.get("SGL_ASCEND_MSMODELSLIM_MATRIX", "ci")
    if chosen in ("ci", "full"):
        return matrix.select(chosen)
    return matrix.select(only=chosen.split(","))


def subset_names():
    return [e.name for e in selected()]


def build_subset() -> Dict[str, "matrix.Built"]:
    """name -> Built for the entries under test; built by the real msmodelslim on a cache miss."""
    return {b.entry.name: b for b in matrix.build_all(selected(), log=lambda *a: None)}


def inspect_and_verify(path: str, reference: Optional[str]):
    """(plan, verify report) of one output; verify loads every layer through the serving loaders and compares
    with `reference` (None: the checkpoint's own float weights)."""
    plan = plan_checkpoint(path)
    return plan, verify_checkpoint(path, reference, progress=False)


def resident_mismatches(plan, report):
    """Layers whose bytes after loading differ from what inspect predicted from the headers."""
    predicted = {layer.prefix: layer.resident_bytes for layer in plan.layers}
    return {e.prefix: (predicted.get(e.prefix), e.resident_bytes) for e in report.layers
            if predicted.get(e.prefix) != e.resident_bytes}


def docs_table() -> str:
    """The table between the markers in docs/conformance.md."""
    with open(DOCS) as f:
        text = f.read()
    start, end = "<!-- matrix:start -->\n", "\n<!-- matrix:end -->"
    return text[text.index(start) + len(start): text.index(end)]
