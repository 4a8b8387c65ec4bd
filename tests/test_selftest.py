"""`sgl-ascend selftest` on a CPU host: every op's twin against its fp64 reference and every scheme's
layer against its checkpoint's dequantized weights, within the stated tolerances (exit 0)."""

import json

from sgl_ascend.tools.cli import main


def test_selftest_passes_on_cpu(capsys):
    assert main(["selftest", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in report["checks"]}
    assert report["passed"] and report["device"].startswith("cpu")
    assert {"npu_grouped_matmul W4A8", "npu_quant_matmul int4 x int4"} <= names
    assert any(n.startswith("msModelSlim MoE W4A8_DYNAMIC") for n in names)
    assert any(n.startswith("compressed-tensors W4A16") for n in names)
    for check in report["checks"]:
        assert check["error"] <= check["tolerance"], check
