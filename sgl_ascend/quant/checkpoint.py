"""Reading sharded safetensors checkpoints: which file holds which tensor, headers without loading.

Both msModelSlim (`quant_model_weights*.safetensors` or the older `quant_model_weight_w8a8*`) and
Hugging Face / compressed-tensors (`model*.safetensors`) layouts are served: an index json when there
is one, every `*.safetensors` in the folder otherwise.
"""

import json
import os
from dataclasses import dataclass
from glob import glob
from typing import Dict, Iterator, List, Tuple

import torch
from safetensors import safe_open

from sgl_ascend.errors import CheckpointError

_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsCheckpoint:
    """All tensors of a checkpoint folder, by name, read lazily."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"checkpoint folder {path} does not exist")
        self._infos: Dict[str, TensorInfo] = {}
        files = self._files_from_index() or sorted(glob(os.path.join(self.path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        for file in files:
            self._read_header(file)
        self._check_index_consistency()
        self._handles = {}

    def _files_from_index(self) -> List[str]:
        self.index: Dict[str, str] = {}
        self.index_file = None
        for index_file in sorted(glob(os.path.join(self.path, "*.safetensors.index.json"))):
            try:
                with open(index_file) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"unreadable index ({exc}); expected a json with a 'weight_map'",
                                      file=index_file) from exc
            self.index.update(weight_map)
            self.index_file = index_file
        files = sorted({os.path.join(self.path, f) for f in self.index.values()})
        for file in files:
            if not os.path.exists(file):
                missing = sorted(k for k, v in self.index.items() if os.path.join(self.path, v) == file)
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CheckpointError(
                    f"the index places it{more} in {os.path.basename(file)}, but that file is missing; "
                    "copy the whole checkpoint folder.",
                    file=self.index_file, tensor=missing[0])
        return files

    def _read_header(self, file: str):
        try:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    info = TensorInfo(name, file, _DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
                    if name in self._infos:
                        raise CheckpointError(
                            f"tensor also stored in {os.path.basename(self._infos[name].file)}; "
                            "shards overlap, the checkpoint is inconsistent.", file=file, tensor=name)
                    self._infos[name] = info
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
            cut = _tensors_past_end(file)
            detail = (f"{len(cut)} tensor(s) end past the file's {os.path.getsize(file)} bytes, first {cut[0]}"
                      if cut else "its header cannot be read")
            raise CheckpointError(
                f"the file is truncated or not safetensors: {detail} ({exc}). Download or copy it again.",
                file=file, tensor=cut[0] if cut else None) from None

    def _check_index_consistency(self):
        for name, fname in self.index.items():
            info = self._infos.get(name)
            if info is None or os.path.basename(info.file) != fname:
                raise CheckpointError(
                    f"the index places it in {fname} but it is "
                    f"{'missing' if info is None else 'in ' + os.path.basename(info.file)}; the shards "
                    "and the index are inconsistent.", file=self.index_file, tensor=name)

    # -- access ---------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def names(self) -> List[str]:
        return sorted(self._infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint", file=self.path,
                                  tensor=name)
        return self._infos[name]

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self._infos.values())

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(info.file, "pt")
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor data ({exc}); the file is truncated.",
                                  file=info.file, tensor=name) from exc

    def with_prefix(self, prefix: str) -> Dict[str, TensorInfo]:
        return tensors_under(self._infos, prefix)


def tensors_under(infos: Dict[str, TensorInfo], prefix: str) -> Dict[str, TensorInfo]:
    """Tensors directly under `prefix.` (suffix -> info), e.g. weight, weight_scale."""
    head = prefix + "."
    return {n[len(head):]: i for n, i in infos.items() if n.startswith(head) and "." not in n[len(head):]}


def _tensors_past_end(file: str) -> List[str]:
    """Names of the tensors a truncated file cannot hold, from the header safetensors refused.

    safetensors rejects the whole file; reading its documented header (u64 length + json) names the
    tensors that are cut, so the error can say which ones. Empty if the header itself is unreadable.
    """
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length > size - 8:
                return []
            header = json.loads(f.read(length))
        available = size - 8 - length
        cut = [(entry["data_offsets"][0], name) for name, entry in header.items()
               if name != "__metadata__" and entry["data_offsets"][1] > available]
        return [name for _, name in sorted(cut)]
    except (OSError, ValueError, KeyError, TypeError):
        return []
