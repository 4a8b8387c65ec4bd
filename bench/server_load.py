"""Weight-load time and peak memory of the real SGLang server on CPU, per scheme, against bf16.

    /path/to/sglang-venv/bin/python bench/server_load.py            # ~3-6 minutes on 2 cores

Writes synthetic checkpoints with Qwen3-1.7B layer proportions (sgl_ascend/testing/synthetic.py;
8 decoder layers by default) to a temp folder, then for each scheme starts `python -m
sglang.launch_server` with the CPU engine's flags (as tests/helpers/sglang_server.py and scripts/cpu_demo.sh)
and this checkout's sgl_ascend first on PYTHONPATH. It waits for SGLang's "Load weight end" log line
(which reports the load time and the memory the weights took), reads the peak RSS (VmHWM) of the
server's processes at that moment, and stops the server: nothing is served, so no tokenizer is
needed. Times are SGLang's own `elapsed=` (model construction + weight loading + processing).
The machine may be shared: the load average is printed with each row.
"""

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sgl_ascend.testing import sglang_server, synthetic  # noqa: E402

# scheme -> extra server flags (msModelSlim schemes by their description name; "CT W4A16": compressed-tensors
# pack-quantized int4, groups of 128)
SCHEMES = {"FLOAT": [], "W8A8": [], "W8A8_DYNAMIC": [], "W4A4_DYNAMIC": ["--quantization", "w4a4_int4"],
           "W4A8_DYNAMIC": [], "W8A16": [], "CT W4A16": []}


def write_checkpoint(path: str, kind: str, layers: int) -> str:
    if kind == "CT W4A16":
        return synthetic.write_ct_w4a16(path, num_hidden_layers=layers)
    return synthetic.write_modelslim(path, kind, num_hidden_layers=layers)
LOAD_END = re.compile(r"Load weight end\. elapsed=([\d.]+) s.*mem usage=([\d.]+) GB")


def _group_peak_rss_mib(pgid: int) -> float:
    """Largest VmHWM among the processes of the server's process group (the scheduler loads the model)."""
    peak = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
    return peak / 1024


def measure(model: str, extra, timeout: float) -> dict:
    """Start the server, wait for "Load weight end", return elapsed / mem usage / peak RSS."""
    with tempfile.NamedTemporaryFile("w+", prefix="server-load-", suffix=".log", delete=False) as log:
        env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
        # nothing is served: no tokenizer needed
        process = sglang_server.start(model, sglang_server.free_port(), log, [*extra, "--skip-tokenizer-init"], env)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with open(log.name, errors="replace") as f:
                    match = LOAD_END.search(f.read())
                if match:
                    return {"elapsed": float(match.group(1)), "mem_gb": float(match.group(2)),
                            "peak_rss_mib": _group_peak_rss_mib(process.pid)}
                if process.poll() is not None:
                    break
                time.sleep(0.2)
            with open(log.name, errors="replace") as f:
                tail = "".join(f.readlines()[-30:])
            raise RuntimeError(f"no 'Load weight end' from the server ({model}):\n{tail}")
        finally:
            sglang_server.stop(process)
            os.unlink(log.name)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per server start")
    args = parser.parse_args()
    schemes = ["FLOAT"] + [s for s in args.schemes if s != "FLOAT"]
    print(f"SGLang server on CPU, synthetic Qwen3-1.7B proportions, {args.layers} layers")
    print("scheme | on disk MiB | load s | load / bf16 | weights GB (log) | peak RSS MiB | peak / bf16 | load avg")
    print("---|---|---|---|---|---|---|---")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for kind in schemes:
            path = write_checkpoint(os.path.join(tmp, kind.replace(" ", "_")), kind, args.layers)
            disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20
            r = measure(path, SCHEMES[kind], args.timeout)
            base = base or r
            name = "bf16" if kind == "FLOAT" else kind
            print(f"{name} | {disk:.0f} | {r['elapsed']:.2f} | {r['elapsed'] / base['elapsed']:.2f} | "
                  f"{r['mem_gb']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} | "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            for f in os.listdir(path):
                os.remove(os.path.join(path, f))


if __name__ == "__main__":
    main()
