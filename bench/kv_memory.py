"""Weight memory and KV pool of the real SGLang server on CPU vs `sgl-ascend inspect --device-memory`'s
prediction, for bf16, W8A8, W8A8 + C8 (int8 KV cache) and W8A8 with the online int8 KV cache
(`--kv-cache-dtype int8`, and with `--kv-cache-skip-layers 0,-1`; inspect takes the same flags).

    /path/to/sglang-venv/bin/python bench/kv_memory.py            # ~7 minutes on 2 cores

Writes synthetic checkpoints with Qwen3-1.7B layer proportions (sgl_ascend/testing/synthetic.py, 4
decoder layers by default; C8: msModelSlim's per-layer kv_cache_scale/offset and description keys),
starts `python -m sglang.launch_server` on each (CPU engine flags of sgl_ascend/testing/sglang_server.py,
but the pool sized by SGLang from memory: --mem-fraction-static F and no token cap), reads SGLang's own
log lines and stops the server once the pool is allocated (nothing is served):
  - "Load weight begin. avail mem=A GB": the memory SGLang sees before the weights; the prediction
    takes it as the device memory (`inspect --device-memory A --mem-fraction F`);
  - "sgl-ascend resident bytes: ... N" (the plugin's count of the served parameters) vs inspect's
    resident bytes; "Load weight end. ... mem usage=W GB": SGLang's own figure (GB = GiB in its logs);
  - "KV Cache is allocated. #tokens: T, K size: K GB, V size: V GB": the pool's bytes per token vs
    inspect's pool bytes, and T vs inspect's pool bytes per token into SGLang's budget (A x F less SGLang's
    weight figure). The online mode's buffers beside the pool (per-token scales, skipped layers' bf16 K/V)
    are not in SGLang's numbers: the "all KV" column is inspect's total with them (tested against the real
    allocation in tests/test_sglang_e2e_kv_cache.py).
On a CPU host SGLang measures memory as the host's available memory (psutil), which other jobs move:
the weight and token ratios carry that noise (the load average is printed); KV bytes per token does not.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sgl_ascend.testing import sglang_server, synthetic  # noqa: E402

# name -> (msModelSlim kind, C8 KV scales, extra server flags)
CHECKPOINTS = {"bf16": ("FLOAT", False, []), "W8A8": ("W8A8", False, []), "W8A8 + C8": ("W8A8", True, []),
               "W8A8 + online int8 KV": ("W8A8", False, ["--kv-cache-dtype", "int8"]),
               "W8A8 + online int8 KV, layers 0,-1 bf16": ("W8A8", False, ["--kv-cache-dtype", "int8",
                                                                           "--kv-cache-skip-layers", "0,-1"])}
GB = 2 ** 30
BEGIN = re.compile(r"Load weight begin\. avail mem=([\d.]+) GB")
END = re.compile(r"Load weight end\..*mem usage=([\d.]+) GB")
RESIDENT = re.compile(r"sgl-ascend resident bytes: .*: (\d+)")
POOL = re.compile(r"KV Cache is allocated\. dtype: ([\w.]+), #tokens: (\d+), K size: ([\d.]+) GB, V size: ([\d.]+) GB")


def server_pool(model: str, flags, mem_fraction: float, timeout: float) -> dict:
    """Start the server, wait for the pool's log line, return SGLang's numbers."""
    with tempfile.NamedTemporaryFile("w+", prefix="kv-memory-", suffix=".log", delete=False) as log:
        env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
        # later flags win: the pool sized from memory (no 4096-token cap)
        extra = ["--skip-tokenizer-init", "--mem-fraction-static", str(mem_fraction),
                 "--max-total-tokens", str(10 ** 9), *flags]
        process = sglang_server.start(model, sglang_server.free_port(), log, extra, env)
        text = ""
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with open(log.name, errors="replace") as f:
                    text = f.read()
                pool = POOL.search(text)
                if pool:
                    return {"avail_gb": float(BEGIN.search(text).group(1)),
                            "weights_gb": float(END.search(text).group(1)), "dtype": pool.group(1),
                            "resident": int(RESIDENT.search(text).group(1)),
                            "tokens": int(pool.group(2)), "kv_gb": float(pool.group(3)) + float(pool.group(4))}
                if process.poll() is not None:
                    break
                time.sleep(0.2)
            raise RuntimeError(f"no 'KV Cache is allocated' from the server ({model}):\n" + text[-3000:])
        finally:
            sglang_server.stop(process)
            os.unlink(log.name)


def inspect(model: str, device_gib: float, mem_fraction: float, kv_flags) -> dict:
    out = subprocess.run([sys.executable, "-m", "sgl_ascend.tools.cli", "inspect", model, "--device-memory",
                          str(device_gib), "--mem-fraction", str(mem_fraction), "--json", *kv_flags],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mem-fraction", type=float, default=0.08)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per server start")
    args = parser.parse_args()
    print(f"SGLang server on CPU, synthetic Qwen3-1.7B proportions, {args.layers} layers, "
          f"--mem-fraction-static {args.mem_fraction}")
    print("checkpoint | KV dtype | weights in server MiB | predicted | ratio | SGLang 'mem usage' GiB | "
          "KV bytes/token in pool | predicted | all KV bytes/token predicted | tokens | predicted | ratio | "
          "tokens per pool GiB / bf16 | load avg")
    print("---|---|---|---|---|---|---|---|---|---|---|---|---|---")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, c8, flags) in CHECKPOINTS.items():
            path = synthetic.write_modelslim(os.path.join(tmp, kind + ("_C8" if c8 else "")), kind, c8=c8,
                                             num_hidden_layers=args.layers)
            s = server_pool(path, flags, args.mem_fraction, args.timeout)
            p = inspect(path, s["avail_gb"], args.mem_fraction, flags)
            fit, kv = p["fit"], p["kv_cache"]
            pool_bpt = s["kv_gb"] * GB / s["tokens"]  # from 2-decimal GiB: +-0.005 GiB
            predicted_bpt = kv["pool_bytes_per_token_per_device"]  # what SGLang sizes its pool by
            # SGLang's budget: the memory it saw before the weights x fraction, less what it measured the
            # weights took (on CPU: the drop of the host's available memory)
            budget = s["avail_gb"] * GB * args.mem_fraction - s["weights_gb"] * GB
            tokens = int(budget // predicted_bpt)
            density = s["tokens"] / s["kv_gb"]
            base = base or density
            print(f"{name} | {s['dtype'].replace('torch.', '')} | {s['resident'] / 2**20:.1f} | "
                  f"{fit['weight_bytes'] / 2**20:.1f} | {s['resident'] / fit['weight_bytes']:.3f} | "
                  f"{s['weights_gb']:.2f} | {pool_bpt:.0f} | {predicted_bpt} | {kv['bytes_per_token_per_device']} | "
                  f"{s['tokens']} | {tokens} | "
                  f"{s['tokens'] / tokens:.3f} | {density / base:.3f} | {os.getloadavg()[0]:.1f}", flush=True)
            for f in os.listdir(path):
                os.remove(os.path.join(path, f))


if __name__ == "__main__":
    main()
