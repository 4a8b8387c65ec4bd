"""Reading sharded safetensors checkpoints: which file holds which tensor, headers without loading.

Both msModelSlim (`quant_model_weights*.safetensors` or the older `quant_model_weight_w8a8*`) and
Hugging Face / compressed-tensors (`model*.safetensors`) layouts are served: an index json when there
is one, every `*.safetensors` in the folder otherwise.
"""

import os
from dataclasses import dataclass
from glob import glob
from typing import Dict, Iterator, List, Tuple

import torch
from safetensors import safe_open

from sgl_ascend.errors import CheckpointError
from sgl_ascend.quant.checks import (TORCH_DTYPES, check_scale_values, is_scale_name, read_index,
                                     read_safetensors_header, shard_path)

_DTYPES = TORCH_DTYPES  # safetensors dtype name -> torch dtype, the ones sgl-ascend reads


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
        # prefix -> {suffix: info}: with_prefix is called once per layer/expert projection, and a scan of
        # every name per call is quadratic (a 235B MoE has ~200k tensors and ~36k expert projections).
        self._by_prefix: Dict[str, Dict[str, TensorInfo]] = {}
        for name, info in self._infos.items():
            head, _, suffix = name.rpartition(".")
            self._by_prefix.setdefault(head, {})[suffix] = info

    def _files_from_index(self) -> List[str]:
        self.index: Dict[str, str] = {}
        self._index_paths: Dict[str, str] = {}  # tensor name -> shard path, checked to lie in the folder
        self.index_file = None
        for index_file in sorted(glob(os.path.join(self.path, "*.safetensors.index.json"))):
            weight_map = read_index(index_file)
            for name, shard in weight_map.items():
                path = shard_path(self.path, shard, index_file, name)
                if name in self.index and self.index[name] != shard:
                    raise CheckpointError(
                        f"the indexes place it in both {self.index[name]} and {shard}; keep the one index "
                        "that belongs to these shards.", file=index_file, tensor=name)
                self.index[name] = shard
                self._index_paths[name] = path
            self.index_file = index_file
        files = sorted(set(self._index_paths.values()))
        for file in files:
            if not os.path.lexists(file):
                missing = sorted(k for k, v in self._index_paths.items() if v == file)
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CheckpointError(
                    f"the index places it{more} in {os.path.basename(file)}, but that file is missing; "
                    "copy the whole checkpoint folder.",
                    file=self.index_file, tensor=missing[0])
        return files

    def _read_header(self, file: str):
        for name, (dtype, shape) in read_safetensors_header(file).items():
            if name in self._infos:
                raise CheckpointError(
                    f"tensor also stored in {os.path.basename(self._infos[name].file)}; "
                    "shards overlap, the checkpoint is inconsistent. Remove the stray shard or re-export.",
                    file=file, tensor=name)
            self._infos[name] = TensorInfo(name, file, dtype, shape)

    def _check_index_consistency(self):
        for name, fname in self.index.items():
            info = self._infos.get(name)
            if info is None or info.file != self._index_paths[name]:
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
            tensor = handle.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - the header was validated: the data is unreadable
            raise CheckpointError(f"cannot read tensor data ({exc}); the file is truncated or unreadable. "
                                  "Download or copy it again.", file=info.file, tensor=name) from None
        if is_scale_name(name):
            check_scale_values(tensor, file=info.file, tensor=name)
        return tensor

    def get_rows(self, name: str, rows: int = 1) -> torch.Tensor:
        """The first `rows` rows of a tensor (dim 0), reading only those bytes."""
        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(info.file, "pt")
        try:
            return handle.get_slice(name)[:rows]
        except Exception as exc:  # noqa: BLE001 - the header was validated: the data is unreadable
            raise CheckpointError(f"cannot read tensor data ({exc}); the file is truncated or unreadable. "
                                  "Download or copy it again.", file=info.file, tensor=name) from None

    def with_prefix(self, prefix: str) -> Dict[str, TensorInfo]:
        return dict(self._by_prefix.get(prefix, {}))


def tensors_under(infos: Dict[str, TensorInfo], prefix: str) -> Dict[str, TensorInfo]:
    """Tensors directly under `prefix.` (suffix -> info), e.g. weight, weight_scale."""
    head = prefix + "."
    return {n[len(head):]: i for n, i in infos.items() if n.startswith(head) and "." not in n[len(head):]}

