"""The tensors of a safetensors checkpoint directory (one `*.safetensors` file, or shards listed by
`model.safetensors.index.json`), read one at a time through the `safetensors` library (numpy, memory-mapped: a
tensor is read when asked for, never the whole checkpoint at once), and writing one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def _open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"safetensors file {path} is unreadable ({error})") from error


class CheckpointFiles:
    """Every tensor's file, shape and dtype; `read(name)` loads one tensor (float32, bfloat16, ... as stored)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self._files():
            with _open(path) as f:
                for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    piece = f.get_slice(name)
                    if name in self.tensors:
                        raise ValueError(f"tensor {name} is in both {self.tensors[name].file} and {path}")
                    self.tensors[name] = TensorInfo(path, tuple(piece.get_shape()), piece.get_dtype())
        self._check_index()

    def _files(self) -> list[Path]:
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map)") from error
            files = sorted({self.directory / name for name in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"{index} lists shards that do not exist: {missing}")
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(
                f"{self.directory} must hold one *.safetensors file or a {INDEX} listing its shards; found "
                f"{[f.name for f in files]}"
            )
        return files

    def _check_index(self) -> None:
        index = self.directory / INDEX
        if not index.is_file():
            return
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, file in weight_map.items():
            if name not in self.tensors or self.tensors[name].file.name != file:
                raise ValueError(f"{index} places tensor {name} in {file}, but that shard does not hold it")

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        try:
            with _open(info.file) as f:
                return f.get_tensor(name)
        except SafetensorError as error:
            raise ValueError(f"tensor {name} in {info.file} is unreadable ({error})") from error


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file of `tensors` (contiguous copies)."""
    save_file({name: np.ascontiguousarray(t) for name, t in tensors.items()}, str(path), metadata=metadata)
