#!/usr/bin/env bash
# Installs what the tests need (first run: ~8 min, mostly sglang) and runs the whole suite:
# unit tests on torch 2.13.0, then the SGLang tests (real sglang.launch_server on CPU) on 2.14.1.
# .venv-msmodelslim (the real msmodelslim 26.1.0) writes the conformance matrix's `ci` subset on a cache
# miss (scripts/msmodelslim_matrix.py, ~/.cache/sgl-ascend/msmodelslim; a few minutes cold).
# It also builds the real model the tests serve (scripts/real_model.py, ~/.cache/sgl-ascend/smollm2).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k w8a8`.
# The fast loop without SGLang: .venv-core/bin/python -m pytest -m "not sglang"
# The SGLang run includes the --tp 2 / --ep-size 2 servers (tests/test_sglang_tp.py, ~9 servers);
# `-m sglang_tp` runs only those, `-m "sglang and not sglang_tp"` leaves them out.
source "$(dirname "$0")/env.sh"
cd "$ROOT"
core_venv
sglang_venv
msmodelslim_venv
"$CORE_VENV/bin/python" -m pytest -m "not sglang" -q "$@"
"$SGLANG_VENV/bin/python" -m pytest -m "sglang" -q "$@"
