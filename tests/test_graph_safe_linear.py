"""Graph safety of every dense scheme's forward: it traces into one graph (torch.compile fullgraph,
dynamic batch) through the registered twins (torch.ops.npu.*, whose fake kernels check the NPU
contract on the traced shapes), the compiled output equals eager bit for bit, and the graph holds no
host work: no host sync (.item() / .tolist() / int(tensor): a graph break fullgraph refuses, or an
`item` node where dynamo captures scalar outputs),
no tensor built from host values per call (torch.tensor / as_tensor / scalar_tensor nodes), and no
branch on data or on the batch size (one graph serves two batch sizes). That is what NPU graph
capture (aclgraph / torchair) needs of a layer's forward.
"""

import pytest
import torch

from helpers.dense_cases import CASES, EXPECTED_OPS
from helpers.linear import calibrated_input

# by name: dynamo traces torch.tensor([symint, ...]) as a wrapper function of the same name
HOST_BUILT = {"tensor", "as_tensor", "scalar_tensor", "asarray"}
HOST_SYNC = {"item", "tolist", "__int__", "__float__", "__bool__", "numpy", "cpu"}


def _trace_cases():
    """Each case's first column layer at tp 1, and its row layer as rank 1 of tp 2 (the rank that holds
    no additive term), where it has one."""
    out = []
    for case in CASES:
        out.append((case, case.kinds[0], 0, 1))
        row = [k for k in case.kinds if k in ("o_proj", "down_proj")]
        if row:
            out.append((case, row[-1], 1, 2))
    return out


TRACE_CASES = _trace_cases()


def _recorder(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def host_work(gm):
    """Nodes of a traced graph that do host work per call."""
    bad = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", None) in HOST_BUILT:
            bad.append(node.format_node())
        if node.op == "call_method" and node.target in HOST_SYNC:
            bad.append(node.format_node())
    return bad


def npu_ops(gm):
    """The torch.ops.npu ops a traced graph calls (packets or overloads)."""
    names = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        qualified = getattr(node.target, "_qualified_op_name", None) or (schema.name if schema else "")
        if qualified.startswith("npu::"):
            names.add(qualified.split("::", 1)[1])
    return names


@pytest.mark.parametrize("case,kind,rank,tp", TRACE_CASES, ids=[f"{c.id}-{k}-tp{t}" for c, k, _, t in TRACE_CASES])
def test_forward_traces_into_one_host_free_graph(case, kind, rank, tp, gen):
    layer = case.build(kind, tp_rank=rank, tp_size=tp)
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(lambda x: layer(x), fullgraph=True, dynamic=True, backend=_recorder(graphs))
    for rows in (5, 11):
        x = calibrated_input(layer, gen, rows, shape=(rows, layer.input_size_per_partition))
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    assert len(graphs) == 1, "the forward was traced more than once (a branch on the batch size or on data)"
    assert not host_work(graphs[0])
    assert npu_ops(graphs[0]) == EXPECTED_OPS[case.scheme]


def test_the_checks_see_host_work(gen):
    """What the old dense W4A8 forward did (a host-built group_list per call) and a host sync are seen."""
    def host_built(x):
        return x * torch.tensor([x.shape[0]], dtype=x.dtype)

    torch._dynamo.reset()
    graphs = []
    torch.compile(host_built, fullgraph=True, dynamic=True, backend=_recorder(graphs))(torch.ones(3, 4))
    assert host_work(graphs[0])

    def host_sync(x):
        return x * x.abs().max().item()

    # dynamo either refuses the host sync under fullgraph, or (capturing scalar outputs) records it
    torch._dynamo.reset()
    graphs = []
    try:
        torch.compile(host_sync, fullgraph=True, dynamic=True, backend=_recorder(graphs))(torch.ones(3, 4))
    except Exception:  # torch._dynamo.exc.Unsupported
        return
    assert host_work(graphs[0])
