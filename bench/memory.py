"""Resident and peak memory of loading + processing a model, per scheme, against bf16 and theory.

    PYTHONPATH=. python bench/memory.py            # ~2 minutes on 2 cores

For each scheme a synthetic checkpoint of Qwen3-1.7B layer proportions (bench/synthetic.py) is
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

RATIO_GOALS = {"W8A8": 0.52, "W8A8_DYNAMIC": 0.52, "W8A16": 0.52}


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
        floats = {spec.name: torch.empty(spec.shape, dtype=config.params_dtype) for spec in layout.floats}
        for spec, layer in zip(layout.linears, layers):
            load_linear(layer, checkpoint, spec.shards, process=False)
        for name, param in floats.items():
            param.copy_(checkpoint.get(name))
        for layer in layers:
            layer.scheme.process_weights_after_loading(layer)
            tracker.sample()
        final = tracker.sample() - base
    params = sum(resident_bytes(layer) for layer in layers) + sum(t.nbytes for t in floats.values())
    mem = plan.memory()
    return {"bf16_bytes": mem["bf16_bytes"], "theoretical_bytes": mem["resident_bytes"],
            "linear_bf16_bytes": sum(e.bf16_bytes for e in plan.layers),
            "linear_params_bytes": sum(resident_bytes(layer) for layer in layers),
            "params_bytes": params, "malloc_final_bytes": final, "malloc_peak_bytes": tracker.peak - base,
            "largest_tensor_bytes": largest, "disk_bytes": mem["disk_bytes"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import synthetic

    schemes = [("bf16", lambda p: synthetic.write_modelslim(p, "FLOAT", num_hidden_layers=args.layers))]
    schemes += [(k, lambda p, k=k: synthetic.write_modelslim(p, k, num_hidden_layers=args.layers))
                for k in synthetic.MODELSLIM_SCHEMES]
    schemes.append(("CT W4A16 g128", lambda p: synthetic.write_ct_w4a16(p, num_hidden_layers=args.layers)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in schemes:
            path = write(os.path.join(tmp, name.replace(" ", "_")))
            out = subprocess.run([sys.executable, __file__, "--measure", path], check=True, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((name, r))
            for f in os.listdir(path):
                os.remove(os.path.join(path, f))
    bf16_total = rows[0][1]["bf16_bytes"]
    header = ("scheme", "resident MiB", "resident/bf16", "linear layers/bf16", "measured/theory", "peak MiB",
              "peak/(final+largest)")
    print(f"model: Qwen3-1.7B layer proportions, {args.layers} layers, vocab 32000 (bf16 total "
          f"{bf16_total / 2**20:.0f} MiB); SGLang load order: build all, load all, process all")
    print(" | ".join(header))
    for name, r in rows:
        q_ratio = r["linear_params_bytes"] / r["linear_bf16_bytes"]
        cells = (name, f"{r['params_bytes'] / 2**20:.1f}", f"{r['params_bytes'] / r['bf16_bytes']:.3f}",
                 f"{q_ratio:.3f}", f"{r['params_bytes'] / r['theoretical_bytes']:.3f} (malloc "
                 f"{r['malloc_final_bytes'] / r['theoretical_bytes']:.3f})",
                 f"{r['malloc_peak_bytes'] / 2**20:.1f}",
                 f"{r['malloc_peak_bytes'] / (r['malloc_final_bytes'] + r['largest_tensor_bytes']):.3f}")
        print(" | ".join(cells))
        goal = RATIO_GOALS.get(name)
        if goal is not None and q_ratio > goal:
            print(f"  GOAL MISSED: {name} linear layers at {q_ratio:.3f} x bf16 > {goal}")
        if r["malloc_peak_bytes"] > r["malloc_final_bytes"] + r["largest_tensor_bytes"]:
            print(f"  GOAL MISSED: {name} peak {r['malloc_peak_bytes'] / 2**20:.1f} MiB > final + largest tensor "
                  f"{(r['malloc_final_bytes'] + r['largest_tensor_bytes']) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
