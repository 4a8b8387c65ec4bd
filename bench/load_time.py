"""Load time of quantized checkpoints against the same model in bf16.

    PYTHONPATH=. python bench/load_time.py         # ~1-2 minutes on 2 cores

Synthetic checkpoints of one shape (sgl_ascend/testing/synthetic.py) are written to a temp folder; each is then
loaded as served: read the safetensors index and headers, build every layer, load every tensor,
process every layer (SGLang's order), plus the float tensors. The files were just written, so they
are in the page cache: this measures CPU-side loading and processing, not disk speed. Fastest of
--repeat runs (the machine is shared).
"""

import argparse
import os
import tempfile
import time

import torch

from sgl_ascend.layers.linear import load_linear
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.testing import synthetic
from sgl_ascend.tools.model_layout import layout_from_config, load_config
from sgl_ascend.tools.plan import build_linear, scheme_source


def load(path: str) -> float:
    start = time.perf_counter()
    config = load_config(path)
    source = scheme_source(path, config)
    layout = layout_from_config(config)
    checkpoint = SafetensorsCheckpoint(path)
    layers = [build_linear(spec, source, config) for spec in layout.linears]
    for spec, layer in zip(layout.linears, layers):
        load_linear(layer, checkpoint, spec.shards, process=False)
    floats = {s.name: checkpoint.get(s.name).to(config.params_dtype) for s in layout.floats}
    for layer in layers:
        layer.scheme.process_weights_after_loading(layer)
    elapsed = time.perf_counter() - start
    del layers, floats
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    schemes = [("bf16", lambda p: synthetic.write_modelslim(p, "FLOAT", num_hidden_layers=args.layers))]
    schemes += [(k, lambda p, k=k: synthetic.write_modelslim(p, k, num_hidden_layers=args.layers))
                for k in ("W8A8_DYNAMIC", "W8A8", "W8A16", "W4A4_DYNAMIC", "W4A8_DYNAMIC")]
    schemes.append(("CT W4A16 g128", lambda p: synthetic.write_ct_w4a16(p, num_hidden_layers=args.layers)))
    print(f"model: Qwen3-1.7B layer proportions, {args.layers} layers; page-cache warm; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("scheme | on disk MiB | load s | load / bf16 load")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in schemes:
            path = write(os.path.join(tmp, name.replace(" ", "_")))
            disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            best = min(load(path) for _ in range(args.repeat))
            base = base or best
            print(f"{name} | {disk / 2**20:.0f} | {best:.2f} | {best / base:.2f}")
            for f in os.listdir(path):
                os.remove(os.path.join(path, f))


if __name__ == "__main__":
    main()
