"""Time and peak memory of `sgl-ascend verify` at two model sizes: the peak follows one layer, not the model.

    PYTHONPATH=. python bench/verify_memory.py              # ~4 minutes on 2 cores
    PYTHONPATH=. python bench/verify_memory.py --layers 2 4 --hidden 1024   # quicker, smaller layers

For each size a synthetic W8A8_DYNAMIC checkpoint of Qwen3-1.7B layer proportions
(sgl_ascend/testing/synthetic.py; the sizes differ in their number of layers only) is written to a
temp folder and a fresh subprocess runs `verify_checkpoint` on it (no --reference). Memory is what
glibc's malloc has handed out (bench/memory.py's PeakTracker: mallinfo2, sampled every 0.2 ms), which
is where torch's CPU tensors live; safetensors reads are file-backed mmap pages the kernel can drop,
not in that count (embeddings, lm_head and float tensors are used straight from those pages). The
peak is compared with the float model (what verify held before it streamed) and with one float
layer + one served layer (`inspect`'s bytes).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


def child(path: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from memory import PeakTracker, malloc_in_use

    from sgl_ascend.tools.verify import verify_checkpoint

    start = malloc_in_use()
    t0 = time.perf_counter()
    with PeakTracker() as tracker:
        report = verify_checkpoint(path, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak": tracker.peak - start,
                      "worst_layer_error": report.worst_layer_error}))


def measure(path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path], check=True, capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def sizes(path: str) -> dict:
    """Bytes from inspect's plan: the float (bf16) model, the served model, one layer of each, embeddings."""
    from sgl_ascend.tools.plan import plan_checkpoint

    plan = plan_checkpoint(path)
    mem = plan.memory()
    layer0 = [e for e in plan.layers if e.prefix.startswith("model.layers.0.")]
    return {"float_model": mem["bf16_bytes"], "served_model": mem["resident_bytes"],
            "float_layer": sum(e.bf16_bytes for e in layer0), "served_layer": sum(e.resident_bytes for e in layer0),
            "floats": plan.floats_resident_bytes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 8], help="the two model sizes, in layers")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (intermediate = 3x)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from sgl_ascend.testing import synthetic

    shape = dict(synthetic.SHAPE, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                 num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 256)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            path = synthetic.write_modelslim(os.path.join(tmp, f"l{layers}"), "W8A8_DYNAMIC", num_hidden_layers=layers,
                                             **{k: v for k, v in shape.items() if k != "num_hidden_layers"})
            rows.append({"layers": layers, **sizes(path), **measure(path), "load": os.getloadavg()[0]})
    print(f"W8A8_DYNAMIC, hidden {args.hidden}, intermediate {3 * args.hidden}, vocab {shape['vocab_size']}; "
          f"{os.cpu_count()} cores")
    print("| layers | float model MiB | served model MiB | float + served layer MiB | embeddings + lm_head MiB "
          "| verify peak MiB | peak / float model | peak / (float + served layer) | seconds | s / layer | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pair = r["float_layer"] + r["served_layer"]
        print(f"| {r['layers']} | {r['float_model'] / MIB:.1f} | {r['served_model'] / MIB:.1f} | {pair / MIB:.1f} | "
              f"{r['floats'] / MIB:.1f} | {r['peak'] / MIB:.1f} | {r['peak'] / r['float_model']:.3f} | "
              f"{r['peak'] / pair:.3f} | {r['seconds']:.1f} | {r['seconds'] / r['layers']:.2f} | {r['load']:.1f} |")
    a, b = rows
    print(f"model x{b['float_model'] / a['float_model']:.2f} -> verify peak x{b['peak'] / a['peak']:.3f}, "
          f"time x{b['seconds'] / a['seconds']:.2f}")


if __name__ == "__main__":
    main()
