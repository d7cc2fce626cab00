"""Sharded or single safetensors → a ``JinaVLM`` in the target dtype, strictly checked.

The model is built on the meta device; each tensor is read from the memory-mapped file, converted
to the target dtype and assigned, so at most one tensor exists twice at a time (never a float32
copy of the whole model). Every problem with the tensor set is collected and reported together.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from .config import JinaVLMConfig
from .errors import CheckpointError
from .models.jina_vlm import JinaVLM, map_official_names

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r} (choose from float32, bfloat16, float16)") from None


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
        with safe_open(f, framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def load_model(
    snapshot: Path,
    cfg: JinaVLMConfig,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
) -> JinaVLM:
    locations = safetensors_files(snapshot)
    with torch.device("meta"):
        model = JinaVLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan, _skipped, unknown = map_official_names(list(locations), cfg)

    handles = {}
    try:
        for f in sorted(set(locations.values())):
            handles[f] = safe_open(f, framework="pt")
            handles[f].__enter__()

        def shape_of(name: str) -> tuple[int, ...]:
            return tuple(handles[locations[name]].get_slice(name).get_shape())

        problems = [f"unexpected tensor '{n}'" for n in sorted(unknown)]
        droppable = []  # fused biases present in the checkpoint but disabled by the config
        for target, parts in sorted(plan.items()):
            if target not in expected:
                if target.endswith(".bias") and all(p == "" or _is_zero(handles, locations, p) for p in parts):
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

        itemsize = torch.empty(0, dtype=dtype).element_size()
        total = sum(expected_numel(expected[t]) for t in plan if t in expected) * itemsize
        done = 0
        state: dict[str, torch.Tensor] = {}
        for target, parts in plan.items():
            if target in droppable:
                continue
            pieces = []
            for p in parts:
                if p:
                    pieces.append(handles[locations[p]].get_tensor(p).to(dtype))
                else:
                    pieces.append(None)
            if len(pieces) == 1:
                tensor = pieces[0]
            else:
                size = expected[target][0] // len(pieces)
                tensor = torch.cat([t if t is not None else torch.zeros(size, dtype=dtype) for t in pieces])
            state[target] = tensor.contiguous()
            done += tensor.nbytes
            if progress:
                progress(done, total)
        for target in set(expected) - set(state):  # absent fused biases
            state[target] = torch.zeros(expected[target], dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    model.eval()
    return model


def expected_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _is_zero(handles, locations, name: str) -> bool:
    return not bool(handles[locations[name]].get_tensor(name).any())


def _official_hint(target: str) -> str:
    for old, new in (("connector.", "model.vision_model.vl_connector."), ("vision.", "model.vision_model."),
                     ("decoder.", "model.language_model.")):
        if target.startswith(old):
            target = new + target[len(old):]
            break
    return target.replace(".attn.qkv.", ".attn.qkv_w.").replace("pooling.q.", "pooling.q_w.").replace(
        "pooling.kv.", "pooling.kv_w.")
