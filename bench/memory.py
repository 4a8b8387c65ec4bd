"""Resident and peak memory of loading + processing a model, per scheme, against bf16 and theory.

    PYTHONPATH=. python bench/memory.py            # ~2 minutes on 2 cores

For each scheme a synthetic checkpoint of Qwen3-1.7B layer proportions (sgl_ascend/testing/synthetic.py) is
written to a temp folder, then a fresh subprocess loads it in SGLang's order: build every layer
(checkpoint-layout parameters), load every tensor, then process every layer. Memory is what glibc's
malloc has handed out (mallinfo2: uordblks + hblkhd), which is where torch's CPU tensors live;
the peak is sampled by a thread every 0.2 ms and after every tensor read.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def malloc_in_use() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakTracker:
    def __init__(self, period_s: float = 0.0002):
        self.peak = malloc_in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def sample(self) -> int:
        now = malloc_in_use()
        self.peak = max(self.peak, now)
        return now

    def _run(self, period_s):
        while not self._stop.is_set():
            self.sample()
            time.sleep(period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def measure(path: str) -> dict:
    """Run in a fresh process: load + process the checkpoint at `path`, report bytes."""
    import torch

    from sgl_ascend.layers.linear import load_linear
    from sgl_ascend.layers.moe import MoELayer, load_moe
    from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
    from sgl_ascend.tools.model_layout import layout_from_config, load_config
    from sgl_ascend.tools.plan import build_linear, plan_checkpoint, resident_bytes, scheme_source

    torch.set_num_threads(2)
    plan = plan_checkpoint(path)
    config = load_config(path)
    source = scheme_source(path, config)
    layout = layout_from_config(config)
    checkpoint = SafetensorsCheckpoint(path)
    largest = max(info.nbytes for info in checkpoint.infos())
    base = malloc_in_use()
    with PeakTracker() as tracker:
        original_get = checkpoint.get

        def get(name):
            tensor = original_get(name)
            tracker.sample()
            return tensor

        checkpoint.get = get
        layers = [build_linear(spec, source, config) for spec in layout.linears]
        experts = [MoELayer(source.moe_method(spec.prefix.rpartition(".")[0], config.params_dtype),
                            num_experts=spec.num_experts, hidden_size=spec.hidden_size,
                            intermediate_size=spec.intermediate_size, params_dtype=config.params_dtype,
                            prefix=spec.prefix) for spec in layout.experts]
        floats = {spec.name: torch.empty(spec.shape, dtype=config.params_dtype) for spec in layout.floats}
        for spec, layer in zip(layout.linears, layers):
            load_linear(layer, checkpoint, spec.shards, process=False)
        for spec, moe in zip(layout.experts, experts):
            load_moe(moe, checkpoint, spec.prefix.rpartition(".")[0])  # loads into the final layout
        for name, param in floats.items():
            param.copy_(checkpoint.get(name))
        for layer in layers:
            layer.scheme.process_weights_after_loading(layer)
            tracker.sample()
        final = tracker.sample() - base
    expert_bytes = sum(resident_bytes(moe) for moe in experts)
    params = (sum(resident_bytes(layer) for layer in layers) + expert_bytes
              + sum(t.nbytes for t in floats.values()))
    mem = plan.memory()
    return {"bf16_bytes": mem["bf16_bytes"], "theoretical_bytes": mem["resident_bytes"],
            "linear_bf16_bytes": sum(e.bf16_bytes for e in plan.layers if e.kind == "linear"),
            "experts_bf16_bytes": sum(e.bf16_bytes for e in plan.layers if e.kind == "experts"),
            "experts_params_bytes": expert_bytes,
            "linear_params_bytes": sum(resident_bytes(layer) for layer in layers),
            "params_bytes": params, "malloc_final_bytes": final, "malloc_peak_bytes": tracker.peak - base,
            "largest_tensor_bytes": largest, "disk_bytes": mem["disk_bytes"]}


def _run(path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", path], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")})
    for f in os.listdir(path):
        os.remove(os.path.join(path, f))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(title: str, rows, part: str, goals: dict) -> None:
    print(title)
    print(f"scheme | resident MiB | resident/bf16 | {part}/bf16 | measured/theory | peak MiB | peak/(final+largest)")
    for name, r in rows:
        ratio = r[f"{part}_params_bytes"] / r[f"{part}_bf16_bytes"]
        print(" | ".join((
            name, f"{r['params_bytes'] / 2**20:.1f}", f"{r['params_bytes'] / r['bf16_bytes']:.3f}", f"{ratio:.3f}",
            f"{r['params_bytes'] / r['theoretical_bytes']:.3f} "
            f"(malloc {r['malloc_final_bytes'] / r['theoretical_bytes']:.3f})",
            f"{r['malloc_peak_bytes'] / 2**20:.1f}",
            f"{r['malloc_peak_bytes'] / (r['malloc_final_bytes'] + r['largest_tensor_bytes']):.3f}")))
        goal = goals.get(name)
        if goal is not None and ratio > goal:
            print(f"  GOAL MISSED: {name} {part} at {ratio:.3f} x bf16 > {goal}")
        if r["malloc_peak_bytes"] > r["malloc_final_bytes"] + r["largest_tensor_bytes"]:
            print(f"  GOAL MISSED: {name} peak {r['malloc_peak_bytes'] / 2**20:.1f} MiB > final + largest tensor "
                  f"{(r['malloc_final_bytes'] + r['largest_tensor_bytes']) / 2**20:.1f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    from sgl_ascend.testing import synthetic

    dense = [("bf16", "FLOAT")] + [(k, k) for k in synthetic.MODELSLIM_SCHEMES]
    moe = [("bf16", "FLOAT")] + [(k, k) for k in synthetic.MOE_EXPERT_SCHEMES]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(name, _run(synthetic.write_modelslim(os.path.join(tmp, name), kind, num_hidden_layers=args.layers)))
                for name, kind in dense]
        rows.append(("CT W4A16 g128", _run(synthetic.write_ct_w4a16(os.path.join(tmp, "ct"),
                                                                    num_hidden_layers=args.layers))))
        moe_rows = [(name, _run(synthetic.write_modelslim_moe(os.path.join(tmp, "moe_" + name), kind)))
                    for name, kind in moe]
    print("SGLang load order: build all layers, load all tensors, process all layers")
    _report(f"dense: Qwen3-1.7B layer proportions, {args.layers} layers, vocab 32000", rows, "linear",
            {"W8A8": 0.52, "W8A8_DYNAMIC": 0.52, "W8A16": 0.52, "W4A4_DYNAMIC": 0.27, "W4A8_DYNAMIC": 0.27,
             "CT W4A16 g128": 0.27})
    s = synthetic.MOE_SHAPE
    _report(f"MoE: Qwen3-30B-A3B expert proportions (hidden 2048, moe_intermediate {s['moe_intermediate_size']}), "
            f"{s['num_experts']} experts x {s['num_hidden_layers']} layers, attention W8A8_DYNAMIC", moe_rows,
            "experts", {"W8A8_DYNAMIC": 0.52, "W4A8_DYNAMIC": 0.27, "W4A4_DYNAMIC": 0.27})


if __name__ == "__main__":
    main()
