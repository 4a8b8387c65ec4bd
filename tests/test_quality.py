"""verify --perplexity (sgl_ascend/tools/quality.py): the report's loss split and its advice."""

import math

import pytest

from helpers.common import QWEN3_BF16, msmodelslim_fixture
from sgl_ascend.tools.quality import OutlierLayer, QualityReport, advise
from sgl_ascend.tools.verify import verify_checkpoint


def _report(weight_loss, activation_loss, outliers=()):
    ref = 10.0
    ppl = {"reference": ref, "weight_only": ref * (1 + weight_loss),
           "served": ref * (1 + weight_loss) * (1 + activation_loss)}
    return QualityReport(400, ppl, 0.9, {}, weight_loss, activation_loss, list(outliers))


OUTLIER = OutlierLayer("model.layers.12.self_attn.qkv_proj", "W8A8", 30.0, 7)


def test_static_w8a8_activation_loss_is_sent_to_smoothing():
    advice = " ".join(advise(_report(0.01, 0.7, [OUTLIER]), {OUTLIER.prefix: "W8A8"}))
    assert "layers.12.self_attn.qkv_proj" in advice and "30x" in advice
    assert "smooth_quant" in advice and "W8A8_DYNAMIC" in advice


def test_outliers_left_in_down_proj_inputs_are_sent_to_the_up_down_subgraph():
    """After norm-linear smoothing (SmolLM2, iter_smooth via msmodelslim's default adapter) only down_proj
    inputs keep outliers; smoothing them needs the up-down pair, which a norm cannot give."""
    down = [OutlierLayer(f"model.layers.{i}.mlp.down_proj", "W8A8", r, 1) for i, r in ((11, 3115.6), (28, 607.0))]
    advice = " ".join(advise(_report(0.017, 0.495, down), {o.prefix: "W8A8" for o in down}))
    assert "up-down" in advice and "exclude" in advice
    mixed = " ".join(advise(_report(0.01, 0.7, [OUTLIER, *down]), {OUTLIER.prefix: "W8A8"}))
    assert "up-down" not in mixed  # a qkv input: its norm can smooth it


def test_int4_activation_loss_is_sent_to_rotation():
    advice = " ".join(advise(_report(0.05, 100.0, [OUTLIER]), {OUTLIER.prefix: "W4A4_DYNAMIC"}))
    assert "QuaRot" in advice


def test_weight_loss_is_sent_to_rounding_and_groups():
    advice = " ".join(advise(_report(0.4, 0.1), {"model.layers.0.mlp.down_proj": "W4A8_DYNAMIC"}))
    assert "autoround" in advice and "per-group" in advice
    assert "QuaRot" not in advice


def test_negligible_loss_needs_nothing():
    assert advise(_report(0.001, 0.002), {"x": "W8A8_DYNAMIC"}) == ["the loss (+0.3% perplexity) is negligible: "
                                                                     "nothing to fix."]


@pytest.mark.parametrize("fixture", ["qwen3-tiny-w8a8", "qwen3-tiny-w8a16"])
def test_verify_perplexity_report_on_a_real_msmodelslim_checkpoint(fixture):
    q = verify_checkpoint(msmodelslim_fixture(fixture), QWEN3_BF16, progress=False, quality=True).quality
    p = q.perplexity
    assert q.tokens > 400 and all(v > 1 for v in p.values())
    # the split multiplies back to the whole loss
    assert math.isclose((1 + q.weight_loss) * (1 + q.activation_loss), 1 + q.loss, rel_tol=1e-9)
    if fixture.endswith("w8a16"):  # weight-only: the served model is the weight-only simulation
        assert abs(q.activation_loss) < 1e-3
    assert 0 <= q.greedy["agreeing_tokens"] <= q.greedy["of"] and q.advice
    assert {o.prefix for o in q.outliers} <= {f"model.layers.{i}.{m}" for i in range(2) for m in
                                              ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                               "mlp.down_proj")}
