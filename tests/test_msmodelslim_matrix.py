"""The conformance matrix: every checkpoint the real msmodelslim 26.1.0 writes for a matrix entry
(scripts/msmodelslim_matrix.py: base dtypes, the shipped presets shrunk, each algorithm alone, the
compressed-tensors writer) is served (inspect plans it, verify loads it through the serving loaders and
passes against the base model, inspect's bytes are the bytes resident after loading) or refused with the
CheckpointError the entry names; docs/conformance.md lists them all. The SGLang server serves one entry
per model family.

Outputs come from the script's cache (built on a miss: the `ci` subset is a few minutes cold);
SGL_ASCEND_MSMODELSLIM_MATRIX=full runs every entry.
"""

import time

import pytest

from helpers.msmodelslim_matrix import (MIN_TOP1, THRESHOLD, docs_table, inspect_and_verify, matrix,
                                        resident_mismatches, subset_names)
from sgl_ascend.errors import CheckpointError

SERVED = [n for n in subset_names() if matrix.BY_NAME[n].expect == matrix.SERVED]
REFUSED = [n for n in subset_names() if matrix.BY_NAME[n].expect == matrix.REFUSED]
NOT_WRITTEN = [n for n in subset_names() if matrix.BY_NAME[n].expect == matrix.NOT_WRITTEN]
SERVE = [n for n in subset_names() if matrix.BY_NAME[n].serve]


def _written(msmodelslim_matrix, name):
    built = msmodelslim_matrix[name]
    assert built.path, f"msmodelslim wrote nothing for {name}:\n{built.record['log_tail'][-2000:]}"
    return built


@pytest.mark.parametrize("name", SERVED)
def test_served_entry_loads_verifies_and_matches_inspect(msmodelslim_matrix, name):
    built = _written(msmodelslim_matrix, name)
    plan, report = inspect_and_verify(built.path, built.base if built.entry.against_base else None)
    assert plan.ok, plan.errors
    print(f"\n[matrix] {name}: worst layer error {report.worst_layer_error:.4f}, top-1 "
          f"{report.top1_agreement:.3f}, logit rel. error {report.logit_rel_error:.4f}")
    assert report.worst_layer_error <= THRESHOLD, report.to_json()["layers"][:3]
    assert report.top1_agreement >= MIN_TOP1, report.prompts
    assert report.layers and all(e.resident_bytes == e.theoretical_bytes for e in report.layers)
    assert not resident_mismatches(plan, report)
    assert {e.prefix for e in report.layers} == {layer.prefix for layer in plan.layers}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_entry_names_the_reason(msmodelslim_matrix, name):
    entry, built = matrix.BY_NAME[name], _written(msmodelslim_matrix, name)
    with pytest.raises(CheckpointError) as info:
        inspect_and_verify(built.path, built.base)
    assert entry.message in str(info.value), str(info.value)


@pytest.mark.parametrize("name", NOT_WRITTEN)
def test_entry_msmodelslim_cannot_write_on_cpu(msmodelslim_matrix, name):
    entry, built = matrix.BY_NAME[name], msmodelslim_matrix[name]
    assert built.path is None, f"msmodelslim now writes {name}: serve or refuse it, and update the matrix"
    assert entry.message in built.record["log_tail"], built.record["log_tail"][-2000:]


def test_docs_list_every_entry():
    assert docs_table() == matrix.markdown_table(matrix.ENTRIES), \
        "docs/conformance.md is stale: paste `python scripts/msmodelslim_matrix.py --markdown` between its markers"


def test_every_entry_has_an_outcome_and_each_family_is_served():
    for entry in matrix.ENTRIES:
        assert entry.expect in (matrix.SERVED, matrix.REFUSED, matrix.NOT_WRITTEN)
        assert (entry.expect == matrix.SERVED) == (not entry.message), entry.name
        assert entry.expect == matrix.SERVED or entry.reason, entry.name
    ci = matrix.select("ci")
    for family in {e.family for e in matrix.ENTRIES if e.expect == matrix.SERVED}:
        assert any(e.family == family and e.serve for e in ci), f"no {family} entry is served by SGLang in CI"


# -- the real SGLang server -------------------------------------------------------------------------

PROMPT = list(range(10, 26))
MAX_TOKENS = 8
TOLERANCE = 0.06  # nats, as tests/test_sglang_e2e_modelslim.py (measured values are printed)


@pytest.mark.sglang
@pytest.mark.parametrize("name", SERVE)
def test_sglang_serves_one_entry_per_family(msmodelslim_matrix, tmp_path, name):
    from helpers.float_reference import (compare, dequantize_modelslim, drop_zero_biases, norm_biases,
                                         teacher_forced_logprobs, write_float_checkpoint)
    from helpers.sglang_server import launch

    built = _written(msmodelslim_matrix, name)
    start = time.monotonic()
    with launch(built.path, built.entry.sglang_args) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        log = server.log_tail(400)
    tensors = drop_zero_biases(dequantize_modelslim(built.path))
    # anti-outlier smoothing leaves float q/k/v biases: the float model needs attention_bias for them
    attention_bias = any(k.endswith("self_attn.q_proj.bias") for k in tensors)
    reference = write_float_checkpoint(built.path, tensors, str(tmp_path / "float"),
                                       {"attention_bias": attention_bias})
    result = compare(served, teacher_forced_logprobs(reference, PROMPT, served["token_ids"], norm_biases(tensors)),
                     TOLERANCE)
    print(f"\n[matrix e2e] {name}: server {time.monotonic() - start:.1f}s, {result}")
    assert len(served["token_ids"]) == MAX_TOKENS
    assert result["ok"], result
    assert "sgl-ascend modelslim config: msModelSlim checkpoint" in log, log[-3000:]
