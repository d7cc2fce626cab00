"""Sharded or single safetensors → a ``JinaVLM`` in the target weight format, strictly checked.

The model is built on the meta device and its linears are swapped for the format's modules
(``engine/quant.py``); each tensor is then read with plain file reads, a block of rows at a time, and
converted (cast, or quantized) straight into its final storage. So the process never holds a float32
copy of the model, nor the checkpoint's pages (no memory map: mapped pages would count as resident
memory until the file is closed). Every problem with the tensor set is collected and reported together.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from .config import JinaVLMConfig
from .engine.quant import WeightFormat, kv_cache_dtype, resolve_format, swap_modules, tensor_dtype
from .errors import CheckpointError
from .models.jina_vlm import JinaVLM, map_official_names

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
CHUNK_BYTES = 8 << 20  # rows read (and converted) per step: bounds the loader's temporary memory, and small
# enough that converting a block just read runs in the CPU caches (int8: the whole load ~25% faster than 64 MiB)


class SafetensorsFile:
    """One ``.safetensors`` file read with ``readinto`` (header parsed here), whole tensors or row ranges."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            (n,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(n))
            header.pop("__metadata__", None)
            self.entries = {k: (_ST_DTYPES[v["dtype"]], tuple(v["shape"]), int(v["data_offsets"][0]))
                            for k, v in header.items()}
        except (struct.error, ValueError, KeyError, TypeError) as e:
            self._file.close()
            raise CheckpointError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})") from None
        self.data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor (all of it by default), in the file's dtype."""
        dtype, shape, offset = self.entries[name]
        if not shape:
            start, stop, row_numel = 0, 1, 1
        else:
            stop = shape[0] if stop is None else stop
            row_numel = expected_numel(shape[1:])
        itemsize = torch.empty(0, dtype=dtype).element_size()
        out = torch.empty((stop - start) * row_numel, dtype=dtype)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        self._file.seek(self.data_start + offset + start * row_numel * itemsize)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.path}: tensor '{name}' is truncated")
            done += got
        return out.view((stop - start, *shape[1:]) if shape else ())

    def close(self) -> None:
        self._file.close()


def safetensors_files(snapshot: Path) -> dict[str, Path]:
    """Official tensor name → the file holding it."""
    index = snapshot / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not (snapshot / f).exists()})
        if missing:
            raise CheckpointError(f"{snapshot}: shard files listed in the index are missing: {', '.join(missing)}")
        return {name: snapshot / f for name, f in weight_map.items()}
    files = sorted(snapshot.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{snapshot}: no *.safetensors weights found")
    out: dict[str, Path] = {}
    for f in files:
        handle = SafetensorsFile(f)
        out.update({k: f for k in handle.keys()})
        handle.close()
    return out


def load_model(
    snapshot: Path,
    cfg: JinaVLMConfig,
    weight_format: WeightFormat | str | torch.dtype,
    progress: Callable[[int, int], None] | None = None,
) -> JinaVLM:
    """Build the model in ``weight_format`` (a format name such as "int8", or a plain dtype)."""
    fmt = resolve_format(weight_format)
    locations = safetensors_files(snapshot)
    with torch.device("meta"):
        model = JinaVLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan, _skipped, unknown = map_official_names(list(locations), cfg)

    handles: dict[Path, SafetensorsFile] = {}
    try:
        for f in sorted(set(locations.values())):
            handles[f] = SafetensorsFile(f)

        def shape_of(name: str) -> tuple[int, ...]:
            return handles[locations[name]].shape(name)

        def read(name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
            return handles[locations[name]].read(name, start, stop)

        problems = [f"unexpected tensor '{n}'" for n in sorted(unknown)]
        droppable = []  # fused biases present in the checkpoint but disabled by the config
        for target, parts in sorted(plan.items()):
            if target not in expected:
                if target.endswith(".bias") and all(p == "" or not bool(read(p).any()) for p in parts):
                    droppable.append(target)
                    continue
                problems.append(f"unexpected tensor {parts} (maps to '{target}', which this config does not use)")
                continue
            if len(parts) == 1:
                want = {parts[0]: expected[target]}
            else:  # fused bias: equal 1-D parts concatenated
                want = {p: (expected[target][0] // len(parts),) for p in parts if p}
            for name, shape in want.items():
                if shape_of(name) != shape:
                    problems.append(f"tensor '{name}' has shape {shape_of(name)}, expected {shape}")
        for target in sorted(set(expected) - set(plan)):
            if target.endswith(".bias") and (".attn.qkv." in target or ".pooling." in target):
                continue  # fused bias with every part absent: zero bias
            problems.append(f"missing tensor for '{target}' (official name: {_official_hint(target)})")
        if problems:
            raise CheckpointError(
                f"{snapshot}: checkpoint does not match the jina-vlm config ({len(problems)} problem(s)):\n  "
                + "\n  ".join(problems)
            )

        swapped = swap_modules(model, fmt)  # still on meta; these linears take their weight via load_weight
        model.kv_dtype = kv_cache_dtype(fmt)

        def nbytes(name: str) -> int:  # progress counts bytes read from the checkpoint
            dtype, shape, _ = handles[locations[name]].entries[name]
            return expected_numel(shape) * torch.empty(0, dtype=dtype).element_size()

        total = sum(nbytes(p) for t, parts in plan.items() if t not in droppable for p in parts if p)
        done = 0
        state: dict[str, torch.Tensor] = {}
        for target, parts in plan.items():
            if target in droppable:
                continue
            module_name, _, leaf = target.rpartition(".")
            dtype = tensor_dtype(fmt, target)
            if leaf == "weight" and module_name in swapped:  # quantize / pack a block of rows at a time
                swapped[module_name].load_weight(lambda a, b, name=parts[0]: read(name, a, b),
                                                 _rows_per_chunk(expected[target]))
            elif len(parts) == 1:
                state[target] = _read_converted(handles[locations[parts[0]]], parts[0], dtype)
            else:
                size = expected[target][0] // len(parts)
                state[target] = torch.cat([read(p).to(dtype) if p else torch.zeros(size, dtype=dtype)
                                           for p in parts])
            done += sum(nbytes(p) for p in parts if p)
            if progress:
                progress(done, total)
        for target in set(expected) - set(plan):  # absent fused biases
            state[target] = torch.zeros(expected[target], dtype=fmt.dtype)
        model.load_state_dict(state, strict=True, assign=True)
    finally:
        for h in handles.values():
            h.close()
    model.eval()
    model.weight_format = fmt.name
    return model


def _rows_per_chunk(shape: tuple[int, ...]) -> int:
    row_bytes = 4 * expected_numel(shape[1:]) if shape else 4
    return max(1, CHUNK_BYTES // row_bytes)


def _read_converted(handle: SafetensorsFile, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Read a tensor into its final dtype a block of rows at a time (one temporary block at most)."""
    shape = handle.shape(name)
    if handle.entries[name][0] == dtype or not shape:
        return handle.read(name).to(dtype)  # a no-op cast when the file already holds the target dtype
    out = torch.empty(shape, dtype=dtype)
    step = _rows_per_chunk(shape)
    for a in range(0, shape[0], step):
        out[a:a + step] = handle.read(name, a, min(a + step, shape[0]))
    return out


def expected_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _official_hint(target: str) -> str:
    for old, new in (("connector.", "model.vision_model.vl_connector."), ("vision.", "model.vision_model."),
                     ("decoder.", "model.language_model.")):
        if target.startswith(old):
            target = new + target[len(old):]
            break
    return target.replace(".attn.qkv.", ".attn.qkv_w.").replace("pooling.q.", "pooling.q_w.").replace(
        "pooling.kv.", "pooling.kv_w.")
