"""Checks that turn a malformed checkpoint into one CheckpointError naming the file, the tensor (or json
key), what was expected and what was found, and what to do, before anything else touches it.

- `read_safetensors_header`: the safetensors header, validated as the format documents it (u64
  little-endian length + a JSON object; each entry a known dtype, a shape of non-negative ints and
  data_offsets that tile the data buffer exactly), so that no later reader meets a header it cannot
  handle.
- `shard_path`: a file named by an index resolves inside the checkpoint folder, nowhere else.
- `read_json_object` / `read_index`: config.json, quant_model_description.json and the index are
  JSON objects in regular files.
- `check_decoder_config` / `check_layers_present`: config.json fields that shape the model are sane
  and agree with the layers the checkpoint holds.
- `check_scale_values`: scales are finite and positive (one pass over the tensor; scales are small).
- `check_int4_in_int8`: int4 values stored one per int8 lie in [-8, 7].
"""

import json
import os
import re
from typing import Dict, Iterable, Optional, Tuple

import torch

from sgl_ascend.errors import CheckpointError, shape_str

# -- safetensors headers ---------------------------------------------------------------------------

# Every dtype the safetensors format defines (safetensors 0.8 `Dtype`), with its size in bits.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64,
}
# The ones sgl-ascend reads (what the checkpoint formats it serves store), as torch dtypes.
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1000 * 1000  # the safetensors library refuses larger headers
_REDOWNLOAD = "Download or copy it again (or re-export the checkpoint)."


def _not_utf8_name(path: str) -> bool:
    try:
        path.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_regular_file(path: str, what: str, *, key: Optional[str] = None, tensor: Optional[str] = None) -> None:
    """`path` is a readable regular file (a symlink to one is fine: the Hugging Face cache links
    snapshot files to its blobs)."""
    name = os.path.basename(path)
    if _not_utf8_name(path):
        raise CheckpointError(
            "the file name is not valid UTF-8, which the safetensors library (and SGLang's loader) cannot "
            "open; rename the file to a UTF-8 name (and its entry in the index, if there is one).",
            file=path, key=key, tensor=tensor)
    if os.path.islink(path) and not os.path.exists(path):
        raise CheckpointError(
            f"{name} is a symbolic link to {os.readlink(path)}, which does not exist; copy the real {what} "
            "into the checkpoint folder.", file=path, key=key, tensor=tensor)
    if os.path.isdir(path):
        raise CheckpointError(
            f"{name} is a directory, but it must be the {what} (a file); remove the directory and copy the "
            f"checkpoint's real {name}.", file=path, key=key, tensor=tensor)
    if not os.path.exists(path):
        raise CheckpointError(f"{name} is missing; copy the whole checkpoint folder.", file=path, key=key,
                              tensor=tensor)
    if not os.path.isfile(path):
        raise CheckpointError(f"{name} is not a regular file (a device, socket or pipe); copy the real {what}.",
                              file=path, key=key, tensor=tensor)
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{name} is not readable; fix its permissions.", file=path, key=key, tensor=tensor)


def read_safetensors_header(file: str) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """name -> (torch dtype, shape) of every tensor of a safetensors file, from its validated header."""
    check_regular_file(file, "safetensors shard")
    size = os.path.getsize(file)
    if size < 8:
        raise CheckpointError(
            f"the file has {size} bytes: its header cannot be read (a safetensors file starts with an 8-byte "
            f"header length); the file is empty or truncated. {_REDOWNLOAD}", file=file)
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > size - 8:
            raise CheckpointError(
                f"its header cannot be read: the header length says {length} bytes but the file has only "
                f"{size - 8} after it; the file is truncated or not safetensors. {_REDOWNLOAD}", file=file)
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"its header cannot be read: it declares {length} header bytes (safetensors allows at most "
                f"{MAX_HEADER_BYTES}); the file is not safetensors or is corrupt. {_REDOWNLOAD}", file=file)
        raw = f.read(length)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"its header cannot be read: the header is not UTF-8 text ({exc}); the file is "
                              f"not safetensors or is corrupt. {_REDOWNLOAD}", file=file) from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise CheckpointError(f"the header lists this tensor twice; the file is corrupt. {_REDOWNLOAD}",
                              file=file, tensor=exc.key) from None
    except ValueError as exc:
        raise CheckpointError(f"its header cannot be read: the header is not valid JSON ({exc}); the file is "
                              f"truncated or not safetensors. {_REDOWNLOAD}", file=file) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"its header is a JSON {_json_type(header)}, but safetensors headers are a JSON object mapping "
            f"tensor names to dtype / shape / data_offsets; the file is corrupt. {_REDOWNLOAD}", file=file)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"__metadata__ must be a JSON object of strings, got {_short(metadata)}; the file is corrupt. "
            f"{_REDOWNLOAD}", file=file, key="__metadata__")
    data_size = size - 8 - length
    spans = []
    result = {}
    for name, entry in header.items():
        dtype, shape, (begin, end) = _entry(file, name, entry)
        bits = SAFETENSORS_DTYPE_BITS[dtype]
        numel = 1
        for s in shape:
            numel *= s
        if (numel * bits) % 8 or numel * bits // 8 != end - begin:
            raise CheckpointError(
                f"shape {shape_str(shape)} of {dtype} needs {_bytes(numel * bits)} bytes but its data_offsets "
                f"[{begin}, {end}] span {end - begin}; the header is corrupt. {_REDOWNLOAD}",
                file=file, tensor=name)
        spans.append((begin, end, name))
        result[name] = (TORCH_DTYPES[dtype], shape)
    spans.sort()
    cut = [name for begin, end, name in spans if end > data_size]
    if cut:
        raise CheckpointError(
            f"the file is truncated or not safetensors: {len(cut)} tensor(s) end past the file's {size} bytes, "
            f"first {cut[0]}. {_REDOWNLOAD}", file=file, tensor=cut[0])
    position = 0
    for begin, end, name in spans:
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else f"leaves a hole at byte {position}"
            raise CheckpointError(
                f"its data_offsets [{begin}, {end}] {problem} (safetensors tensors tile the data buffer); "
                f"the header is corrupt. {_REDOWNLOAD}", file=file, tensor=name)
        position = end
    if position != data_size:
        raise CheckpointError(
            f"{data_size - position} bytes follow the last tensor's data, which the header does not account "
            f"for; the file is corrupt or was written over. {_REDOWNLOAD}", file=file,
            tensor=spans[-1][2] if spans else None)
    return result


def _bytes(bits: int) -> str:
    return str(bits // 8) if bits % 8 == 0 else f"{bits / 8}"


class _DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(file: str, name: str, entry):
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(
            f"header entry {_short(entry)} is not an object with dtype, shape and data_offsets; the header is "
            f"corrupt. {_REDOWNLOAD}", file=file, tensor=name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise CheckpointError(
            f"dtype {_short(dtype)} is not a safetensors dtype; the header is corrupt. {_REDOWNLOAD}",
            file=file, tensor=name)
    if dtype not in TORCH_DTYPES:
        raise CheckpointError(
            f"dtype {dtype} is a safetensors dtype that no scheme sgl-ascend serves stores (it reads "
            f"{', '.join(TORCH_DTYPES)}); re-export the checkpoint with the dtypes its format documents "
            "(e.g. I32 for packed int4, I8 for int8 weights).", file=file, tensor=name)
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(
            f"shape {_short(shape)} is not a list of non-negative integers; the header is corrupt. {_REDOWNLOAD}",
            file=file, tensor=name)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(
            f"data_offsets {_short(offsets)} are not [begin, end] with 0 <= begin <= end; the header is corrupt. "
            f"{_REDOWNLOAD}", file=file, tensor=name)
    return dtype, tuple(shape), tuple(offsets)


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -- where an index may send the reader ---------------------------------------------------------------

def shard_path(folder: str, name, index_file: str, tensor: str) -> str:
    """The path of shard `name` (as an index names it), which must lie inside the checkpoint folder.

    Names are relative paths without `..` that stay inside `folder` once resolved (directories
    included); the shard itself may be a symbolic link to a file, as in the Hugging Face cache.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(
            f"the index maps it to {_short(name)}, not a shard file name; fix the index's weight_map.",
            file=index_file, tensor=tensor)
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        raise CheckpointError(
            f"the index maps it to {name!r}, an absolute path; shards are files inside the checkpoint folder, "
            "named relative to it. Fix the index's weight_map.", file=index_file, tensor=tensor)
    parts = re.split(r"[\\/]", name)
    folder = os.path.abspath(folder)
    path = os.path.normpath(os.path.join(folder, name))
    real_folder = os.path.realpath(folder)
    real_parent = os.path.realpath(os.path.dirname(path))
    if ".." in parts or os.path.commonpath([folder, path]) != folder or \
            os.path.commonpath([real_folder, real_parent]) != real_folder:
        raise CheckpointError(
            f"the index maps it to {name!r}, which lies outside the checkpoint folder {folder}; sgl-ascend "
            "reads shards inside the checkpoint folder only. Fix the index's weight_map.",
            file=index_file, tensor=tensor)
    return path


# -- json files ------------------------------------------------------------------------------------

MAX_JSON_BYTES = 256 << 20


def read_json_object(path: str, what: str, missing: str) -> dict:
    """The JSON object in `path` (config.json, the description, an index); `missing` is the message
    when the file does not exist."""
    if not os.path.lexists(path):
        raise CheckpointError(missing, file=path)
    check_regular_file(path, what)
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{size} bytes is far too large for {what}; the file is not what its name "
                              "says. Copy the real one.", file=path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"not valid json: not UTF-8 text ({exc}); copy the real {what}.", file=path) from None
    except ValueError as exc:
        raise CheckpointError(f"not valid json ({exc}); copy the real {what}.", file=path) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"the file holds a JSON {_json_type(value)} ({_short(value)}), but {what} is a "
                              f"JSON object; copy the real one.", file=path)
    return value


def read_index(path: str) -> Dict[str, str]:
    """weight_map of a `*.safetensors.index.json`: tensor name -> shard file name."""
    index = read_json_object(path, "the safetensors index", f"{os.path.basename(path)} is missing")
    if "weight_map" not in index:
        raise CheckpointError("unreadable index: it has no 'weight_map'; expected a json with a 'weight_map' "
                              "object (tensor name -> shard file). Copy the real index or delete it.",
                              file=path, key="weight_map")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"weight_map is a JSON {_json_type(weight_map)}, expected an object mapping tensor name -> shard "
            "file name; copy the real index or delete it (the shards are then read directly).",
            file=path, key="weight_map")
    return weight_map


# -- config.json -------------------------------------------------------------------------------------

def check_decoder_config(config, path: str) -> None:
    """Fields that size the model: positive, and consistent with each other."""
    def need(ok: bool, key: str, message: str):
        if not ok:
            raise CheckpointError(f"{message}; fix config.json (copy it from the original model).", file=path,
                                  key=key)

    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        value = getattr(config, key)
        need(value > 0, key, f"{key} is {value}, it must be positive")
    need(config.num_hidden_layers >= 0, "num_hidden_layers",
         f"num_hidden_layers is {config.num_hidden_layers}, it cannot be negative")
    if config.num_key_value_heads is not None:
        kv = config.num_key_value_heads
        need(kv > 0, "num_key_value_heads", f"num_key_value_heads is {kv}, it must be positive")
        need(config.num_attention_heads % kv == 0, "num_key_value_heads",
             f"num_key_value_heads {kv} does not divide num_attention_heads {config.num_attention_heads}")
    if config.head_dim is not None:
        need(config.head_dim > 0, "head_dim", f"head_dim is {config.head_dim}, it must be positive")
    else:
        need(config.hidden_size % config.num_attention_heads == 0, "num_attention_heads",
             f"hidden_size {config.hidden_size} does not divide into {config.num_attention_heads} heads and "
             "there is no head_dim")
    need(config.decoder_sparse_step >= 1, "decoder_sparse_step",
         f"decoder_sparse_step is {config.decoder_sparse_step}, it must be at least 1")
    need(config.num_experts >= 0, "num_experts", f"num_experts is {config.num_experts}, it cannot be negative")
    if config.num_experts > 0:
        need(config.moe_intermediate_size > 0, "moe_intermediate_size",
             f"moe_intermediate_size is {config.moe_intermediate_size}, it must be positive in an MoE model")
        need(0 < config.num_experts_per_tok <= config.num_experts, "num_experts_per_tok",
             f"num_experts_per_tok is {config.num_experts_per_tok}, it must be in 1..{config.num_experts}")


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_layers_present(num_layers: int, names: Iterable[str], path: str) -> None:
    """config.json's num_hidden_layers agrees with the decoder layers the checkpoint holds: no tensors of
    layers beyond it (they would be silently unused), and no layers missing at the end (a whole
    missing layer, or a num_hidden_layers far too large, is one error instead of one per tensor)."""
    extra: Dict[int, str] = {}
    present = set()
    for name in names:
        m = _LAYER.match(name)
        if m:
            present.add(int(m.group(1)))
        if m and int(m.group(1)) >= num_layers:
            extra.setdefault(int(m.group(1)), name)
    if present and not extra and max(present) + 1 < num_layers:
        raise CheckpointError(
            f"num_hidden_layers is {num_layers} but the checkpoint holds tensors of layers up to "
            f"{max(present)} only; layers {max(present) + 1}..{num_layers - 1} are missing. Copy the missing "
            f"shards, or set num_hidden_layers to {max(present) + 1} if the model really has that many.",
            file=path, key="num_hidden_layers")
    if extra:
        last = max(extra)
        raise CheckpointError(
            f"num_hidden_layers is {num_layers} but the checkpoint holds tensors of layer(s) "
            f"{', '.join(str(i) for i in sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''} (e.g. "
            f"{extra[min(extra)]}); their weights would be silently unused. Set num_hidden_layers to {last + 1} "
            "in config.json if the checkpoint is right, or re-export it from the model config.json describes.",
            file=path, key="num_hidden_layers")


# -- values -----------------------------------------------------------------------------------------

# Checkpoint tensors that hold scales, which every served format stores finite and positive:
# msModelSlim weight_scale / weight_scale_second / input_scale / deq_scale (int64 carries fp32 bits)
# / kv_cache_scale, compressed-tensors weight_scale / input_scale.
SCALE_SUFFIXES = ("weight_scale", "weight_scale_second", "input_scale", "deq_scale", "kv_cache_scale")


def is_scale_name(name: str) -> bool:
    return name.rpartition(".")[2] in SCALE_SUFFIXES


def check_scale_values(values: torch.Tensor, *, file: str, tensor: str) -> None:
    """Finite, non-zero, positive: one pass over the scale, located on the first offending value."""
    if values.dtype == torch.int64:
        from sgl_ascend.ops.scales import decode_int64_scale

        values = decode_int64_scale(values)
    if not values.dtype.is_floating_point or values.numel() == 0:
        return
    bad = ~(values > 0) | ~torch.isfinite(values)  # NaN compares false
    if not bool(bad.any()):
        return
    flat = values.float().reshape(-1)
    nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
    zero, negative = int((flat == 0).sum()), int((flat < 0).sum())
    first = int(bad.reshape(-1).nonzero()[0])
    where = list(torch.unravel_index(torch.tensor(first), values.shape)) if values.dim() else []
    found = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite"), (zero, "zero"),
                                                        (negative, "negative")) if n)
    zero_rows = ""
    if values.dim() == 2 and zero:
        rows = int(((values == 0).all(dim=1)).sum())
        zero_rows = f"; {rows} row(s) entirely zero" if rows else ""
    raise CheckpointError(
        f"scale values must be finite and positive, found {found} of {values.numel()}{zero_rows} (first at index "
        f"{[int(i) for i in where]}: {flat[first].item()}); the quantization went wrong or the file is "
        "corrupt. Re-quantize the model (or re-download the checkpoint).", file=file, tensor=tensor)


def check_int4_in_int8(values: torch.Tensor, *, file: str, tensor: str, scheme: str, sampled: bool = False) -> None:
    """int4 weights stored one value per int8 byte lie in [-8, 7]. sampled: `values` is a sample of the
    tensor (some rows), not all of it; the message says so."""
    if values.numel() == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < -8 or hi > 7:
        raise CheckpointError(
            f"values span [{lo}, {hi}]{' (sampled)' if sampled else ''} but {scheme} stores int4 weights one per int8 byte, in [-8, 7]; "
            "the description's scheme (or version) does not match the tensor. Fix the description or re-export "
            "the checkpoint.", file=file, tensor=tensor)
