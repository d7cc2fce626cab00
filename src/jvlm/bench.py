"""``jvlm bench``: jina-vlm's speed on this machine, jvlm's weight formats vs the transformers reference path.

One run measures, side by side and each in its own subprocess (clean peak RSS, never two 2.4B models
in memory at once):
- the machine: memory bandwidth (large copy; large read) and matmul peak per dtype;
- jvlm in each weight format, loaded through ``jvlm.load`` from a full-size random checkpoint written
  once to the cache (float32, like the official one), driven through ``vlm.chat`` (the real engine);
- the reference path: transformers' ``SiglipVisionModel`` (all 27 blocks + post-LN, hidden states
  out, as the official remote code runs it) + the connector + ``Qwen3ForCausalLM.generate``, holding
  the same weights, in float32 (the transformers default) and bfloat16.

Figures are medians over repeats; each is also given as a fraction of its floor on this machine
(decode: weight bytes streamed per token ÷ copy bandwidth; vision and prefill: FLOPs ÷ matmul peak).
Random weights: speed does not depend on weight values, so the answers are gibberish and EOS is ignored.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULT_TAG = "JVLM_BENCH_RESULT "
CHECKPOINT_VERSION = 1
QUESTION = "What is in this picture? Answer in one sentence."
FOLLOW_UP = "What colours dominate it?"
IMAGE_ANSWER_TOKENS = 8  # the image prompt's answer: its first token is the TTFT, the rest decode at ~1.1k context
FORMATS = ("int8", "bfloat16", "float32")
SLOW_FORMATS = ("float32",)  # one image-prompt repeat and 12 decoded tokens: keeps the run under 10 minutes
# a phase's wall time ÷ the first jvlm format's (int8), measured on a 2-core AVX-512 VM: estimates whether an
# optional phase still fits the time budget
PHASE_COST = {"int8": 1.0, "bfloat16": 1.35, "float32": 1.55, "float16": 2.0}
REFERENCES = ("bfloat16", "float32")


# ============================================================================================ helpers
def _now() -> float:
    return time.perf_counter()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Contention:
    """CPU time that *other* processes used while we timed something (this machine may be shared)."""

    def __init__(self, budget: float = 60.0):
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.worst = 0.0  # largest share of the machine others took during a timed section
        self.budget = budget  # total seconds this phase may spend waiting for idle CPUs
        self.waited = 0.0

    def _busy(self) -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:8]]
            return (sum(v) - v[3] - v[4]) / self._tick
        except OSError:
            return 0.0

    @staticmethod
    def _own() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def wait_idle(self, max_wait: float) -> None:
        """Wait (at most ``max_wait`` s) until others leave the CPUs alone for a moment."""
        start = _now()
        deadline = start + min(max_wait, max(0.0, self.budget - self.waited))
        while _now() < deadline:
            b, o = self._busy(), self._own()
            time.sleep(0.25)
            if (self._busy() - b) - (self._own() - o) < 0.05:
                break
        self.waited += _now() - start

    def timed(self, fn):
        """Run fn, return (its result, wall seconds); remember how much CPU others took meanwhile."""
        b, o, t = self._busy(), self._own(), _now()
        out = fn()
        wall = _now() - t
        others = max(0.0, (self._busy() - b) - (self._own() - o))
        self.worst = max(self.worst, others / (wall * (os.cpu_count() or 1)) if wall > 0.05 else 0.0)
        return out, wall


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_info() -> dict:
    flags = []
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
    import torch

    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "isa": [f for f in wanted if f in flags], "memory_bytes": mem, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


# ============================================================================================ the checkpoint
def ensure_checkpoint(cache_dir: Path, log=print) -> Path:
    """A full-size jina-vlm snapshot with random float32 weights (written once, ~9.9 GB, then reused)."""
    from .testing import jina_vlm_config, official_tensor_shapes, write_tiny_checkpoint

    snap = cache_dir / f"jina-vlm-random-v{CHECKPOINT_VERSION}"
    if (snap / "COMPLETE").exists():
        return snap
    import torch
    from safetensors.torch import save_file

    log(f"writing a full-size random checkpoint to {snap} (once; ~9.9 GB) ...")
    t0 = _now()
    write_tiny_checkpoint(snap, shards=1)  # tokenizer, templates, processor configs
    for f in list(snap.glob("*.safetensors")) + list(snap.glob("model.safetensors.index.json")):
        f.unlink()
    config = jina_vlm_config(full=True)
    shapes = official_tensor_shapes(config)
    generator = torch.Generator().manual_seed(0)
    shard_limit = 1 << 30
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 4 * _numel(shape)
        if shards[-1] and size + n > shard_limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: _random_weight(n, shapes[n], generator) for n in names}, snap / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    total = sum(4 * _numel(s) for s in shapes.values())
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (snap / "config.json").write_text(json.dumps(config, indent=2))
    (snap / "COMPLETE").write_text(f"written in {_now() - t0:.0f}s\n")
    log(f"  done in {_now() - t0:.0f}s")
    return snap


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _random_weight(name: str, shape: tuple[int, ...], generator):
    """Like ``jvlm.testing.random_tensor`` (activations stay O(1)), but uniform: cheaper to draw."""
    import torch

    if name.endswith(("attn.q_b", "attn.k_b", "attn.v_b")) and "language_model" in name:
        return torch.zeros(shape)
    if "lnorm" in name or name.endswith("ln_f.weight"):
        return torch.full(shape, 1.0 if name.endswith("weight") else 0.0)
    if name.endswith(("embedding.embedding", "new_embedding", "pos_embed", "pad_embed")):
        return torch.empty(shape).uniform_(-1.7, 1.7, generator=generator)
    if len(shape) == 1:
        return torch.empty(shape).uniform_(-0.17, 0.17, generator=generator)
    bound = (3.0 / shape[-1]) ** 0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def bench_image():
    """A synthetic 800×600 photo-like image (gradients + noise): 7 crops, 1054 image tokens."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:600, 0:800]
    base = np.stack([x * 255 // 799, y * 255 // 599, (x + y) * 127 // 1398], axis=-1)
    return Image.fromarray(np.clip(base + rng.integers(0, 60, size=(600, 800, 3)), 0, 255).astype(np.uint8))


def image_conversation(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def text_prompts(n: int) -> list[list[dict]]:
    topics = ["the sea", "a mountain village", "a robot learning to paint", "the history of bread", "a night train",
              "an old lighthouse", "a city in the rain", "a chess tournament"]
    return [[{"role": "user", "content": f"Write a long story about {topics[i % len(topics)]}."}] for i in range(n)]


# ============================================================================================ FLOPs and bytes
def model_costs(cfg) -> dict:
    """Analytic work of one crop / one prompt token / one decoded token (multiply-add = 2 FLOPs)."""
    v, c, t = cfg.vision, cfg.connector, cfg.text
    n = v.num_patches
    W, Fv = v.hidden_size, v.ffn_size
    vision_block = 2 * n * (W * 3 * W + W * W + 2 * W * Fv) + 4 * n * n * W
    patch = 2 * n * (v.patch_size ** 2 * 3) * W
    windows = 196
    connector = 2 * (windows * 4 * c.input_size * 2 * c.hidden_size + windows * c.input_size * c.hidden_size
                     + windows * c.hidden_size * c.hidden_size
                     + windows * c.hidden_size * 2 * c.projector_size + windows * c.projector_size * c.output_size)
    D, q, kv = t.hidden_size, t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    layer_params = D * (q + 2 * kv) + q * D + D * 2 * t.ffn_size + t.ffn_size * D
    return {
        "vision_flops_per_crop_jvlm": patch + v.blocks_needed * vision_block + connector,
        "vision_flops_per_crop_reference": patch + v.n_layers * vision_block + connector,
        "decoder_linear_params": t.n_layers * layer_params,
        "head_params": D * t.vocab_size,
        "attention_flops_per_token_pair": 4 * q * t.n_layers,  # QKᵀ and PV for one (query, key) pair
    }


def prefill_flops(cfg, tokens: int) -> float:
    costs = model_costs(cfg)
    causal_pairs = tokens * (tokens + 1) / 2
    return 2 * tokens * costs["decoder_linear_params"] + costs["attention_flops_per_token_pair"] * causal_pairs \
        + 2 * costs["head_params"]


# ============================================================================================ phases
def phase_machine(args) -> dict:
    """Bandwidth and matmul peaks of this machine, with the threads jvlm uses."""
    import torch
    import torch.nn.functional as F

    from .engine.quant import _fbgemm_pack, fbgemm_available, quantize_rows

    cont = Contention(budget=2 * args.wait_idle)
    out = {"machine": machine_info()}
    def best(fn, n):
        times = []
        for _ in range(n):
            cont.wait_idle(args.wait_idle / 4)
            fn()
            times.append(cont.timed(fn)[1])
        return min(times)

    out.update(memory_bandwidth(best))
    peaks = {}
    n = 2048
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        x, w = torch.randn(4 * n, n).to(dtype), torch.randn(2 * n, n).to(dtype)
        peaks[name] = 2 * 4 * n * n * 2 * n / best(lambda x=x, w=w: F.linear(x, w), 3) / 1e9
    xq = torch.randint(-127, 127, (4 * n, n), dtype=torch.int8)
    wq = torch.randint(-127, 127, (2 * n, n), dtype=torch.int8)
    peaks["int8 (_int_mm)"] = 2 * 4 * n * n * 2 * n / best(lambda: torch._int_mm(xq, wq.t()), 3) / 1e9
    if fbgemm_available():
        packed = _fbgemm_pack(*quantize_rows(torch.randn(2 * n, n)))
        xf = torch.randn(4 * n, n)
        peaks["int8 (fbgemm)"] = 2 * 4 * n * n * 2 * n / best(
            lambda: torch.ops.quantized.linear_dynamic(xf, packed, False), 3) / 1e9
    out["matmul_peak_GFLOPs"] = peaks
    out["others_cpu_share"] = cont.worst
    return out


def memory_bandwidth(best, size: int = 1 << 30) -> dict:
    import torch

    a = torch.ones(size // 4, dtype=torch.float32)  # far beyond the caches
    b = torch.empty_like(a)
    return {"copy_GBps": 2 * a.nbytes / best(lambda: b.copy_(a), 5) / 1e9,
            "read_GBps": a.nbytes / best(lambda: a.sum(), 5) / 1e9}


def bandwidth_now() -> float:
    """Copy bandwidth right now (GB/s; it drifts on a shared host): the decode floor of this phase."""
    def best(fn, n):
        fn()
        times = []
        for _ in range(n):
            t = _now()
            fn()
            times.append(_now() - t)
        return min(times)

    return memory_bandwidth(best, 512 << 20)["copy_GBps"]  # 2 × 512 MiB: beyond any L3 a VM may share


def _wait(cont: Contention, args) -> None:
    if args.wait_idle:
        cont.wait_idle(args.wait_idle)


def phase_jvlm(args, fmt: str) -> dict:
    import torch

    import jvlm

    cont = Contention(budget=6 * args.wait_idle)
    snap = Path(args.checkpoint)
    rss0 = _rss()
    t0 = _now()
    vlm = jvlm.load(snap, dtype=fmt)
    load_s = _now() - t0
    model, engine = vlm.model, vlm.engine
    engine.eos_ids = set()  # random weights: never stop early
    weight_bytes = _weight_bytes(model)
    out = {"format": fmt, "load_s": load_s, "rss_after_load": _rss(), "rss_before_load": rss0,
           "weight_bytes": weight_bytes, "threads": torch.get_num_threads()}
    conversation = image_conversation(bench_image())
    t = model.cfg.text
    kv_per_token = 2 * t.n_layers * t.n_kv_heads * t.head_dim * torch.empty(0, dtype=model.cache_dtype).element_size()
    slow = fmt in SLOW_FORMATS
    repeats_ttft = 1 if slow else args.repeats_ttft
    decode_tokens = min(args.decode_tokens, 12) if slow else args.decode_tokens

    def chat(conversations, max_new_tokens):
        """vlm.chat, also tracking the KV bytes alive at its peak: what the engine held + the new caches."""
        nonlocal kv_peak
        batch = conversations if isinstance(conversations[0], list) else [conversations]
        new = sum(len(vlm.prepare(c).ids) + max_new_tokens for c in batch) * kv_per_token
        kv_peak = max(kv_peak, engine.prefixes.nbytes + new)
        _wait(cont, args)
        return cont.timed(lambda: vlm.chat(conversations, max_new_tokens=max_new_tokens))[0]

    kv_peak = 0
    # warm-up, the same for jvlm and the reference: one crop through the vision tower + a short text
    # answer, so that one-off costs (kernel primitives, heap growth) stay out of the first TTFT sample
    first_image = vlm.prepare(conversation).images[0].inputs
    t0 = _now()
    with torch.inference_mode():
        model.encode_images(first_image.crops[:1], first_image.masks[:1])
    vlm.chat(text_prompts(1)[0], max_new_tokens=2)
    out["warmup_s"] = _now() - t0
    ttft, vision, prefill, follow, cached, prompt_tokens, follow_tokens = [], [], [], [], [], 0, 0
    image_decode = []
    for _ in range(repeats_ttft):
        engine.features.entries.clear()
        engine.prefixes.clear()
        first = chat(conversation, IMAGE_ANSWER_TOKENS)
        ttft.append(first.timings.time_to_first_token_s)
        image_decode.append((first.usage.completion_tokens - 1) / first.timings.decode_s)
        vision.append(first.timings.vision_s)
        prefill.append(first.timings.prefill_s - first.timings.vision_s)
        prompt_tokens = first.usage.prompt_tokens
        second = chat(conversation + [{"role": "assistant", "content": first.text},
                                      {"role": "user", "content": FOLLOW_UP}], 1)
        follow.append(second.timings.time_to_first_token_s)
        cached.append(second.usage.cached_tokens)
        follow_tokens = second.usage.prompt_tokens
    n_crops = len(vlm.prepare(conversation).images[0].inputs.crops)
    out.update(crops=n_crops, prompt_tokens=prompt_tokens, follow_up_prompt_tokens=follow_tokens,
               ttft_s=median(ttft), vision_s_per_crop=median(vision) / n_crops, prefill_s=median(prefill),
               prefill_tok_s=prompt_tokens / median(prefill), follow_up_ttft_s=median(follow),
               follow_up_cached_tokens=int(median(cached)), samples_ttft=ttft, samples_follow=follow,
               decode_image_tok_s=median(image_decode), samples_decode_image=image_decode)

    # the peak RSS of loading, the image prompt and the follow-up (the decode runs below hold far less KV;
    # their bandwidth probes must not count)
    out.update(kv_peak_bytes=kv_peak, peak_rss=_peak_rss())

    def decode_rate(conversations, tokens) -> float:
        engine.prefixes.clear()
        before_tokens, before_s = engine.stats.decode_tokens, engine.stats.decode_s
        chat(conversations, tokens)
        return (engine.stats.decode_tokens - before_tokens) / (engine.stats.decode_s - before_s)

    # the host's bandwidth drifts: each b=1 sample is bracketed by bandwidth probes, and each b=8 sample
    # follows its b=1 sample at once, so the b=8 / b=1 ratio compares neighbours
    b1, b8, b1_bandwidth = [], [], []
    for i in range(args.repeats):
        before = bandwidth_now()
        b1.append(decode_rate(text_prompts(1)[0], decode_tokens))
        b1_bandwidth.append((before + bandwidth_now()) / 2)
        if i < (1 if slow else max(1, args.repeats - 1)):
            b8.append(decode_rate(text_prompts(8), decode_tokens))
    out.update(decode_b1_tok_s=median(b1), decode_b8_tok_s=median(b8), samples_b1=b1, samples_b8=b8,
               b8_over_b1=median([x / y for x, y in zip(b8, b1, strict=False)]),
               decode_tokens=decode_tokens, others_cpu_share=cont.worst, waited_s=cont.waited,
               copy_GBps_at_decode=median(b1_bandwidth), samples_b1_copy_GBps=b1_bandwidth)
    return out


def _b8_ratio(row: dict) -> float:
    """b=8 aggregate ÷ b=1: the median over neighbouring sample pairs where the run has them."""
    return row.get("b8_over_b1") or row["decode_b8_tok_s"] / row["decode_b1_tok_s"]


def _weight_bytes(model) -> int:
    """Bytes of every weight the model holds, in its stored format (packed weights included)."""
    total = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    return total + sum(m.weight_nbytes() for m in model.modules() if hasattr(m, "weight_nbytes"))


# ---------------------------------------------------------------------------------------- reference path
class _TokenClock:
    """A ``generate`` streamer that only notes when each new token arrives (its first call is the prompt)."""

    def __init__(self):
        self.start, self.tokens, self._prompt_seen = _now(), [], False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.tokens.append(_now())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def build_reference(snapshot: Path, dtype):
    """transformers' Qwen3ForCausalLM + SiglipVisionModel (27 blocks) + jvlm's plain connector, on the
    snapshot's weights in ``dtype``: each tensor read and cast once, no float32 copy of the model."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from .checkpoint import SafetensorsFile, safetensors_files
    from .config import JinaVLMConfig
    from .models.connector import Connector
    from .models.jina_vlm import map_official_names

    cfg = JinaVLMConfig.from_file(snapshot / "config.json")
    locations = safetensors_files(snapshot)
    files = {f: SafetensorsFile(f) for f in set(locations.values())}

    def read(name):
        return files[locations[name]].read(name).to(dtype)

    t, v = cfg.text, cfg.vision
    qc = Qwen3Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.ffn_size,
        num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads,
        head_dim=t.head_dim, hidden_act="silu", max_position_embeddings=t.max_sequence_length,
        rms_norm_eps=t.norm_eps, tie_word_embeddings=False, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta}, dtype=dtype)
    with torch.device("meta"):
        lm = Qwen3ForCausalLM(qc)
    L = "model.language_model."
    sd = {"model.embed_tokens.weight": read(L + "embedding.embedding"), "model.norm.weight": read(L + "ln_f.weight"),
          "lm_head.weight": read("lm_head.weight")}
    q, kv = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    for i in range(t.n_layers):
        p, o = f"model.layers.{i}.", f"{L}layers.{i}."
        wq, wk, wv = read(o + "attn.qkv_w.weight").split([q, kv, kv])
        value, gate = read(o + "ffn.up.weight").chunk(2)
        sd.update({p + "input_layernorm.weight": read(o + "attn_lnorm.weight"),
                   p + "post_attention_layernorm.weight": read(o + "ffn_lnorm.weight"),
                   p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": read(o + "attn.out.weight"),
                   p + "self_attn.q_norm.weight": read(o + "attn.q_lnorm.weight"),
                   p + "self_attn.k_norm.weight": read(o + "attn.k_lnorm.weight"),
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": value,
                   p + "mlp.down_proj.weight": read(o + "ffn.down.weight")})
    lm.load_state_dict(sd, strict=True, assign=True)
    lm.model.rotary_emb = type(lm.model.rotary_emb)(qc)  # non-persistent buffers: rebuild off meta
    new_embedding = read(L + "embedding.new_embedding")
    del sd

    sc = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.ffn_size, num_hidden_layers=v.n_layers,
                            num_attention_heads=v.n_heads, image_size=v.image_size, patch_size=v.patch_size,
                            layer_norm_eps=v.norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    with torch.device("meta"):
        vision = SiglipVisionModel(sc)
    V, P, W = "model.vision_model.", v.patch_size, v.hidden_size
    sd = {"embeddings.patch_embedding.weight": read(V + "patch_embed.proj.weight").view(W, P, P, 3).permute(0, 3, 1, 2)
          .contiguous(), "embeddings.patch_embedding.bias": read(V + "patch_embed.proj.bias"),
          "embeddings.position_embedding.weight": read(V + "pos_embed"),
          "post_layernorm.weight": read(V + "post_lnorm.weight"), "post_layernorm.bias": read(V + "post_lnorm.bias")}
    for i in range(v.n_layers):
        p, o = f"encoder.layers.{i}.", f"{V}layers.{i}."
        wq, wk, wv = read(o + "attn.qkv_w.weight").chunk(3)
        sd.update({p + "layer_norm1.weight": read(o + "attn_lnorm.weight"),
                   p + "layer_norm1.bias": read(o + "attn_lnorm.bias"),
                   p + "layer_norm2.weight": read(o + "ffn_lnorm.weight"),
                   p + "layer_norm2.bias": read(o + "ffn_lnorm.bias"),
                   p + "self_attn.q_proj.weight": wq, p + "self_attn.q_proj.bias": read(o + "attn.q_b"),
                   p + "self_attn.k_proj.weight": wk, p + "self_attn.k_proj.bias": read(o + "attn.k_b"),
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.v_proj.bias": read(o + "attn.v_b"),
                   p + "self_attn.out_proj.weight": read(o + "attn.out.weight"),
                   p + "self_attn.out_proj.bias": read(o + "attn.out.bias"),
                   p + "mlp.fc1.weight": read(o + "ffn.up.weight"), p + "mlp.fc1.bias": read(o + "ffn.up.bias"),
                   p + "mlp.fc2.weight": read(o + "ffn.down.weight"), p + "mlp.fc2.bias": read(o + "ffn.down.bias")})
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in vision.state_dict()) else ""
    vision.load_state_dict({prefix + k: x for k, x in sd.items()}, strict=True, assign=True)
    for name, buffer in list(vision.named_buffers()):  # non-persistent buffers (position ids): rebuild off meta
        if buffer.is_meta and name.endswith("position_ids"):
            owner = vision.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(v.num_patches).expand((1, -1)), persistent=False)
    assert not any(t.is_meta for t in list(vision.parameters()) + list(vision.buffers()))
    del sd

    with torch.device("meta"):
        connector = Connector(cfg.connector)
    plan, _, _ = map_official_names([n for n in locations if ".vl_connector." in n], cfg)
    state = {}
    for target, parts in plan.items():
        pieces = [read(p) for p in parts if p]
        state[target.removeprefix("connector.")] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    connector.load_state_dict(state, strict=True, assign=True)
    for f in files.values():
        f.close()
    return cfg, lm.eval(), vision.eval(), connector.eval(), new_embedding


def phase_reference(args, dtype_name: str) -> dict:
    import torch

    import jvlm

    from .testing.reference import patchify  # noqa: F401 - documents the inverse used below

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    cont = Contention(budget=6 * args.wait_idle)
    t0 = _now()
    cfg, lm, vision, connector, new_embedding = build_reference(Path(args.checkpoint), dtype)
    load_s = _now() - t0
    weight_bytes = sum(p.nbytes for m in (lm, vision, connector) for p in m.parameters()) + new_embedding.nbytes
    out = {"dtype": dtype_name, "load_s": load_s, "weight_bytes": weight_bytes, "rss_after_load": _rss(),
           "threads": torch.get_num_threads()}
    # the real preprocessing and prompt layout, from jvlm's processor (no model needed)
    processor = _processor(Path(args.checkpoint))
    conversation = image_conversation(bench_image())
    prompt = processor(conversation)
    image = prompt.images[0]
    crops, masks = image.inputs.crops, image.inputs.masks
    P = cfg.vision.patch_size
    side = cfg.vision.image_size // P
    pixels = crops.view(len(crops), side, side, P, P, 3).permute(0, 5, 1, 3, 2, 4).reshape(
        len(crops), 3, side * P, side * P).to(dtype)  # inverse of patchify: (N, 3, 378, 378)
    layers = cfg.vision.feature_layers

    def encode():
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states  # 28 entries
        features = torch.cat([hidden[i + 1] for i in layers], dim=-1)
        keep = ~(crops == -1).flatten(1).all(dim=1)
        return connector(features * keep.to(dtype)[:, None, None], masks)

    def embed(ids, feats, image_obj):
        ids_t = torch.tensor(ids)
        base = lm.model.embed_tokens.weight.shape[0]
        extra = ids_t >= base
        x = lm.model.embed_tokens(ids_t.masked_fill(extra, 0))
        x[extra] = new_embedding[ids_t[extra] - base]
        pos = image_obj.positions
        keep = pos >= 0
        x.index_add_(0, pos[keep], feats[keep].to(dtype))
        return x[None]

    def generate(inputs_embeds=None, input_ids=None, tokens=1, streamer=None):
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                      streamer=streamer)
        if inputs_embeds is not None:
            n = inputs_embeds.shape[1]
            return lm.generate(inputs_embeds=inputs_embeds, attention_mask=torch.ones(1, n, dtype=torch.long),
                               **kwargs)
        return lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)

    tok = jvlm.tokenizer.TextTokenizer(Path(args.checkpoint))

    def text_ids(batch: int) -> torch.Tensor:
        ids = [tok.encode(tok.render(c, add_generation_prompt=True)) for c in text_prompts(batch)]
        n = min(len(i) for i in ids)
        return torch.tensor([i[:n] for i in ids])  # equal lengths: no padding needed

    vision_s, prefill_s, ttft, image_decode = [], [], [], []
    with torch.inference_mode():
        t0 = _now()  # the same warm-up as jvlm's: one crop through the vision tower + a short text answer
        vision(pixel_values=pixels[:1], output_hidden_states=True)
        generate(input_ids=text_ids(1), tokens=2)
        out["warmup_s"] = _now() - t0
        for _ in range(args.repeats_ttft_reference):
            _wait(cont, args)
            feats, tv = cont.timed(encode)
            emb = embed(prompt.ids, feats, image)
            clock = _TokenClock()
            cont.timed(lambda e=emb, c=clock: generate(inputs_embeds=e, tokens=IMAGE_ANSWER_TOKENS, streamer=c))
            tp = clock.tokens[0] - clock.start
            image_decode.append((len(clock.tokens) - 1) / (clock.tokens[-1] - clock.tokens[0]))
            vision_s.append(tv)
            prefill_s.append(tp)
            ttft.append(tv + tp)
        # follow-up: the reference has no cache across calls; it encodes the image again and prefills the
        # whole longer conversation. Measured as one more prefill of that prompt + the vision time above.
        vlm_text = "The picture shows a colourful gradient."
        follow_prompt = processor(conversation + [{"role": "assistant", "content": vlm_text},
                                                  {"role": "user", "content": FOLLOW_UP}])
        _wait(cont, args)
        _, tf = cont.timed(lambda: generate(inputs_embeds=embed(follow_prompt.ids, feats, follow_prompt.images[0])))
        n_crops = len(crops)
        out.update(crops=n_crops, prompt_tokens=len(prompt.ids), ttft_s=median(ttft),
                   vision_s_per_crop=median(vision_s) / n_crops, prefill_s=median(prefill_s),
                   prefill_tok_s=len(prompt.ids) / median(prefill_s), follow_up_ttft_s=median(vision_s) + tf,
                   follow_up_prompt_tokens=len(follow_prompt.ids), samples_ttft=ttft,
                   decode_image_tok_s=median(image_decode), samples_decode_image=image_decode)

        out["peak_rss"] = _peak_rss()
        bandwidths: list[float] = []

        def decode_rate(batch: int, tokens: int) -> float:
            input_ids = text_ids(batch)
            _wait(cont, args)
            bandwidths.append(bandwidth_now())
            _, t1 = cont.timed(lambda: generate(input_ids=input_ids, tokens=1))
            _, tn = cont.timed(lambda: generate(input_ids=input_ids, tokens=tokens))
            bandwidths.append(bandwidth_now())
            return batch * (tokens - 1) / max(tn - t1, 1e-9)

        b1 = [decode_rate(1, args.decode_tokens_reference) for _ in range(args.repeats_reference)]
        b1_bandwidth = [(bandwidths[2 * i] + bandwidths[2 * i + 1]) / 2 for i in range(len(b1))]
        b8 = [decode_rate(8, max(4, args.decode_tokens_reference // 2))]
    out.update(decode_b1_tok_s=median(b1), decode_b8_tok_s=median(b8), samples_b1=b1, samples_b8=b8,
               others_cpu_share=cont.worst, waited_s=cont.waited, copy_GBps_at_decode=median(b1_bandwidth),
               samples_b1_copy_GBps=b1_bandwidth)
    return out


# ---------------------------------------------------------------------------------------- linear kernels
KERNEL_SHAPE = (2048, 6144)  # (K, N): the decoder's FFN down projection's transpose; 12.6 M weights
KERNEL_ROWS = (1, 2, 4, 8, 16, 64, 256, 1024)


def phase_kernels(args) -> dict:
    """Every candidate linear kernel at one decoder shape over rows per call: where each one wins."""
    import torch
    import torch.nn.functional as F

    from .engine import quant

    K, N = KERNEL_SHAPE
    copies = 4  # rotate over 4 weights (4 × 12.6 MB int8 > the caches): decode-like streaming
    weights = [torch.randn(N, K) / K**0.5 for _ in range(copies)]
    candidates = {
        "float32 F.linear": [lambda x, w=w: F.linear(x, w) for w in weights],
        "bfloat16 F.linear": [lambda x, w=w: F.linear(x.bfloat16(), w) for w in [w.bfloat16() for w in weights]],
    }
    modules = [  # (label, module class, backend, available here)
        ("bfloat16 oneDNN prepacked", quant.PackedLinear, None, True),
        ("int8 torch (_weight_int8pack_mm ≤4 rows, else _int_mm W8A8)", quant.Int8Linear, "torch", True),
        ("int8 FBGEMM W8A8 per token (jvlm's decoder)", quant.Int8Linear, "fbgemm", quant.fbgemm_available()),
        ("int8 oneDNN W8A8 per token (jvlm's vision tower)", quant.Int8LinearOneDNN, None,
         quant.onednn_int8_available()),
    ]
    for label, cls, backend, available in modules:
        if available:
            candidates[label] = [cls(K, N, False) for _ in weights]
            for m, w in zip(candidates[label], weights, strict=True):
                m.load_weight(lambda a, b, w=w: w[a:b], 4096, backend)
    quant.tune_allocator()
    cont = Contention(budget=4 * args.wait_idle)
    table = {}
    with torch.inference_mode():
        for name, fns in candidates.items():
            row = {}
            for M in KERNEL_ROWS:
                x = torch.randn(M, K)
                reps = max(1, 64 // M)

                def run(x=x, fns=fns, reps=reps):
                    for _ in range(reps):
                        for f in fns:
                            f(x)

                run()
                times = []
                for _ in range(3):
                    cont.wait_idle(args.wait_idle / 4)
                    times.append(cont.timed(run)[1] / (reps * copies))
                row[M] = min(times)
            table[name] = row
    return {"shape": KERNEL_SHAPE, "ms": {k: {m: t * 1e3 for m, t in v.items()} for k, v in table.items()},
            "others_cpu_share": cont.worst}


def render_kernels(results: dict, command: str) -> str:
    r = results.get("kernels", {})
    if "ms" not in r:
        return f"kernels phase failed: {r.get('error')}\n"
    K, N = r["shape"]
    rows = list(next(iter(r["ms"].values())))
    lines = [f"## Linear kernels: {K}→{N} (float input; ms per call, best of 3; int8 GB/s-equivalent or GOP/s)", "",
             f"- command: `{command}`; date: {datetime.date.today().isoformat()}", "",
             "| kernel | " + " | ".join(f"{m} rows" for m in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for name, per_m in r["ms"].items():
        cells = []
        for m in rows:
            ms = per_m[m]
            rate = f"{K * N / (ms * 1e6):.0f} GB/s" if int(m) <= 8 else f"{2 * int(m) * K * N / (ms * 1e6):.0f} GOP/s"
            cells.append(f"{ms:.3f} ({rate})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "GB/s counts one byte per weight (the int8 size) whatever the kernel reads, so the columns "
              "compare the time to apply the same weights.", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- quality at full size
def phase_quality(args, fmt: str) -> dict:
    """Each format against float32 on the full-size random weights: one image prompt and four text
    prompts, teacher-forced on float32's greedy continuation (float32 runs first and saves its outputs)."""
    import torch

    import jvlm

    from .engine.kv_cache import KVCache
    from .models.decoder import Segment

    saved_path = Path(args.cache_dir) / "quality-float32.pt"
    vlm = jvlm.load(Path(args.checkpoint), dtype=fmt)
    vlm.engine.eos_ids = set()
    model = vlm.model
    conversations = [image_conversation(bench_image())] + text_prompts(4)
    saved = None if fmt == "float32" else torch.load(saved_path)
    outputs, metrics = [], {"hidden_rel": [], "logits_rel": [], "top1_agreement": [], "features_rel": []}
    with torch.inference_mode():
        for i, conversation in enumerate(conversations):
            prompt = vlm.prepare(conversation)
            continuation = (vlm.chat(conversation, max_new_tokens=16).token_ids if saved is None
                            else saved[i]["continuation"])
            ids = list(prompt.ids) + list(continuation)
            x = model.decoder.embedding(torch.tensor(ids))
            features = None
            if prompt.images:
                image = prompt.images[0]
                features = model.encode_images(image.inputs.crops, image.inputs.masks).float()
                keep = image.positions >= 0
                x.index_add_(0, image.positions[keep], features[keep].to(x.dtype))
            cache = KVCache(model.cfg.text, len(ids), model.cache_dtype)
            h = model.decoder(x, torch.arange(len(ids)), [Segment(cache, 0, len(ids))])
            tail = model.lm_head(h[len(prompt.ids) - 1:-1]).float()  # logits that predict the continuation
            out = {"continuation": continuation, "hidden": h.float(), "logits": tail, "features": features}
            outputs.append(out)
            if saved is not None:
                ref = saved[i]

                def rel(a, b):
                    return float((a - b).norm() / b.norm())

                metrics["hidden_rel"].append(rel(out["hidden"], ref["hidden"]))
                metrics["logits_rel"].append(rel(tail, ref["logits"]))
                metrics["top1_agreement"].append(float((tail.argmax(-1) == ref["logits"].argmax(-1)).float().mean()))
                if features is not None:
                    metrics["features_rel"].append(rel(features, ref["features"]))
    if saved is None:
        torch.save(outputs, saved_path)
        return {"format": fmt, "saved": str(saved_path)}
    return {"format": fmt, **{k: {"max": max(v), "mean": sum(v) / len(v)} for k, v in metrics.items() if v},
            "top1_agreement_min": min(metrics["top1_agreement"])}


def _processor(snapshot: Path):
    from .config import JinaVLMConfig
    from .images.tiling import ImageProcessorConfig
    from .processor import Processor
    from .tokenizer import TextTokenizer

    cfg = JinaVLMConfig.from_file(snapshot / "config.json")
    image_config = ImageProcessorConfig.from_dict(json.loads((snapshot / "preprocessor_config.json").read_text()))
    return Processor(TextTokenizer(snapshot), image_config, cfg.text.max_sequence_length)


def run_phase(args) -> int:
    import torch

    from .engine.quant import tune_allocator

    if args.threads:
        torch.set_num_threads(args.threads)
    kind, _, name = args.phase.partition(":")
    if kind == "machine":
        tune_allocator()
        result = phase_machine(args)
    elif kind == "jvlm":
        result = phase_jvlm(args, name)  # jvlm.load tunes the allocator itself
    elif kind == "reference":
        result = phase_reference(args, name)
    elif kind == "quality":
        result = phase_quality(args, name)
    elif kind == "kernels":
        result = phase_kernels(args)
    else:
        raise SystemExit(f"unknown phase {args.phase!r}")
    result["phase"] = args.phase
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ============================================================================================ the driver
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"jvlm weight formats to measure, comma-separated (default: {','.join(FORMATS)})")
    parser.add_argument("--reference", default=",".join(REFERENCES),
                        help="dtypes of the transformers reference path, comma-separated, or 'none' "
                             f"(default: {','.join(REFERENCES)})")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the decode measurements (default 3)")
    parser.add_argument("--repeats-ttft", type=int, default=2,
                        help="repeats of the image prompt + follow-up through jvlm (default 2)")
    parser.add_argument("--repeats-reference", type=int, default=2, help="decode repeats of the reference (default 2)")
    parser.add_argument("--repeats-ttft-reference", type=int, default=1,
                        help="repeats of the reference's image prompt (default 1: ~20-50 s each)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per jvlm measurement")
    parser.add_argument("--decode-tokens-reference", type=int, default=12, help="tokens decoded per reference run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, = physical cores)")
    parser.add_argument("--wait-idle", type=float, default=10.0,
                        help="before each timed section wait up to this many seconds for other processes to "
                             "leave the CPUs idle (shared machines; 0 = never wait)")
    parser.add_argument("--time-budget", type=float, default=570.0,
                        help="seconds: formats after the first are measured only while the run's estimated end "
                             "stays within this (default 570, so a run stays under 10 minutes; 0 = measure all)")
    parser.add_argument("--cache-dir", default=str(Path("~/.cache/jvlm/bench").expanduser()),
                        help="where the full-size random checkpoint is written once and reused")
    parser.add_argument("--quality", action="store_true",
                        help="instead of speed: each format's error against float32 on the full-size random weights")
    parser.add_argument("--kernels", action="store_true",
                        help="instead of the model: every candidate linear kernel over rows per call (crossovers)")
    parser.add_argument("--output", default="", help="write the markdown report to this file")
    parser.add_argument("--json", default="", help="write the raw results to this JSON file")
    parser.add_argument("--phase", default="", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="",
                        help="benchmark this snapshot instead of the cached full-size random one (e.g. a tiny one)")


def bench_main(args: argparse.Namespace) -> int:
    if args.phase:
        return run_phase(args)
    t_start = _now()
    log = _log
    snap = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(Path(args.cache_dir), log)
    formats = [f for f in args.formats.split(",") if f]
    references = [] if args.reference in ("", "none") else [r for r in args.reference.split(",") if r]
    phases = ["machine"] + [f"jvlm:{f}" for f in formats] + [f"reference:{r}" for r in references]
    # what the targets need runs first (the machine, the first format, the reference); the other formats
    # follow while the time budget allows
    optional = [f"jvlm:{f}" for f in formats[1:]]
    order = [p for p in phases if p not in optional] + optional
    if args.quality:
        phases = order = ["quality:float32"] + [f"quality:{f}" for f in formats if f != "float32"]
    if args.kernels:
        phases = order = ["kernels"]
    results = {}
    for phase in order:
        if phase in optional and args.time_budget and f"jvlm:{formats[0]}" in results:
            first = results[f"jvlm:{formats[0]}"]["phase_wall_s"]
            estimate = first * PHASE_COST.get(phase.partition(":")[2], 2.0) / PHASE_COST.get(formats[0], 1.0)
            if _now() - t_start + estimate > args.time_budget:
                results[phase] = {"skipped": f"it would have ended the run past --time-budget {args.time_budget:.0f} s "
                                             f"(estimated {estimate:.0f} s at {_now() - t_start:.0f} s)"}
                log(f"[{_now() - t_start:5.0f}s] {phase} skipped: {results[phase]['skipped']}")
                continue
        log(f"[{_now() - t_start:5.0f}s] {phase} ...")
        results[phase] = _run_subprocess(args, phase, snap)
        if "error" in results[phase]:
            log(f"  failed: {results[phase]['error']}")
    results = {p: results[p] for p in phases if p in results}  # report order
    total = _now() - t_start
    command = "python benchmarks/bench.py " + " ".join(_argv_tail())
    if args.kernels:
        report = render_kernels(results, command)
    elif args.quality:
        report = render_quality(results, command)
    else:
        report = render_report(results, command, total, snap)
    print(report)
    if args.output:
        Path(args.output).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "total_s": total, "command": command}, indent=1))
    return 0 if all("error" not in r for r in results.values()) else 1


def _argv_tail() -> list[str]:
    argv = sys.argv[1:]
    return argv[1:] if argv and argv[0] == "bench" else argv


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_subprocess(args, phase: str, snap: Path) -> dict:
    cmd = [sys.executable, "-m", "jvlm.bench", "--phase", phase, "--checkpoint", str(snap)]
    for key in ("cache_dir", "repeats", "repeats_ttft", "repeats_reference", "repeats_ttft_reference", "decode_tokens",
                "decode_tokens_reference", "threads", "wait_idle"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    t0 = _now()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["phase_wall_s"] = _now() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "phase_wall_s": _now() - t0}


# ============================================================================================ the report
def render_report(results: dict, command: str, total_s: float, snapshot: Path) -> str:
    from .config import JinaVLMConfig

    cfg = JinaVLMConfig.from_file(snapshot / "config.json")
    costs = model_costs(cfg)
    machine = results.get("machine", {})
    info = machine.get("machine", {})
    bw = machine.get("copy_GBps", float("nan"))
    peaks = machine.get("matmul_peak_GFLOPs", {})
    streamed = costs["decoder_linear_params"] + costs["head_params"]  # weights read per decoded token
    bytes_per_param = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
    peak_of = {"float32": peaks.get("float32"), "bfloat16": peaks.get("bfloat16"), "float16": peaks.get("bfloat16"),
               "int8": peaks.get("int8 (fbgemm)") or peaks.get("int8 (_int_mm)")}
    gib, nan = 1 << 30, float("nan")

    rows = []
    for phase, r in results.items():
        if phase == "machine" or "error" in r or "skipped" in r:
            continue
        kind, _, fmt = phase.partition(":")
        vision_flops = costs["vision_flops_per_crop_jvlm" if kind == "jvlm" else "vision_flops_per_crop_reference"]
        peak = (peak_of.get(fmt) or nan) * 1e9
        tokens = r.get("prompt_tokens", 0)
        phase_bw = r.get("copy_GBps_at_decode") or bw
        per_token = streamed * bytes_per_param.get(fmt, 4)
        decode_floor = phase_bw * 1e9 / per_token  # tok/s at the bandwidth limit
        samples, probes = r.get("samples_b1", []), r.get("samples_b1_copy_GBps", [])
        if samples and len(samples) == len(probes):  # each sample against the bandwidth probed around it
            decode_frac = median([rate / (b * 1e9 / per_token) for rate, b in zip(samples, probes, strict=True)])
        else:
            decode_frac = r["decode_b1_tok_s"] / decode_floor
        rows.append({
            "label": f"jvlm {fmt}" if kind == "jvlm" else f"reference {fmt}", "kind": kind, "fmt": fmt, **r,
            "vision_floor_frac": vision_flops / peak / r["vision_s_per_crop"],
            "prefill_floor_frac": prefill_flops(cfg, tokens) / peak / r["prefill_s"] if tokens else nan,
            "decode_floor": decode_floor, "decode_floor_frac": decode_frac,
            "phase_bw": phase_bw,
        })
    refs = [x for x in rows if x["kind"] == "reference"]

    def best_ref(key, higher=True):
        values = [x[key] for x in refs if x.get(key) is not None and x[key] == x[key]]  # skips missing and NaN
        return (max(values) if higher else min(values)) if values else nan

    ref_vision, ref_prefill = best_ref("vision_s_per_crop", False), best_ref("prefill_tok_s")
    ref_b1, ref_ttft = best_ref("decode_b1_tok_s"), best_ref("ttft_s", False)
    ref_image_decode = best_ref("decode_image_tok_s")
    lines = [
        "# jvlm benchmarks", "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; wall time of the whole run: {total_s / 60:.1f} min",
        f"- machine: {info.get('cpu', '?')}, {info.get('logical_cpus', '?')} logical CPUs, "
        f"{info.get('memory_bytes', 0) / gib:.0f} GiB; ISA: {', '.join(info.get('isa', [])) or '?'}; "
        f"torch {info.get('torch', '?')} with {info.get('torch_threads', '?')} threads; {info.get('platform', '')}",
        f"- measured limits: copy bandwidth {bw:.1f} GB/s (read+write bytes / time; read-only "
        f"{machine.get('read_GBps', nan):.1f} GB/s); matmul peak (8192×2048 @ 2048×4096) "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()),
        "- model: the real jina-vlm 2.4B geometry with random weights (speed does not depend on the values); "
        "jvlm phases load a full-size float32 checkpoint through `jvlm.load` and run the engine (`vlm.chat`); "
        "each phase runs in its own process.",
        "- image prompt: an 800×600 image + a short question "
        f"({rows[0].get('crops', '?') if rows else '?'} crops, {rows[0].get('prompt_tokens', '?') if rows else '?'} "
        "prompt tokens); follow-up: a second question on the same image in the same conversation; decode: "
        "after a short text prompt; batch 8: eight such prompts decoded together; decode after the image: the "
        f"image prompt's answer ({IMAGE_ANSWER_TOKENS} tokens) after its first token, at ~1.1k tokens of context "
        "(the reference's timed by a `generate` streamer). Every phase (jvlm and the "
        "reference alike) first runs one warm-up: one crop through the vision tower + a two-token text answer.",
        "",
        "| | vision s/crop | prefill tok/s | TTFT s | follow-up TTFT s | decode b=1 tok/s | decode b=8 tok/s "
        "| decode b=1 after the image tok/s | peak RSS GiB | weights GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['label']} | {x['vision_s_per_crop']:.2f} ({x['vision_floor_frac']:.0%}) "
            f"| {x['prefill_tok_s']:.0f} ({x['prefill_floor_frac']:.0%}) | {x['ttft_s']:.1f} "
            f"| {x['follow_up_ttft_s']:.2f} | {x['decode_b1_tok_s']:.1f} ({x['decode_floor_frac']:.0%}) "
            f"| {x['decode_b8_tok_s']:.1f} | {x.get('decode_image_tok_s', nan):.1f} "
            f"| {x['peak_rss'] / gib:.2f} | {x['weight_bytes'] / gib:.2f} |")
    lines += [
        "", "In parentheses: the fraction of the floor. Vision and prefill: FLOPs (analytic) ÷ the matmul peak of "
        "the format's compute dtype (int8: the FBGEMM peak) ÷ the time. Decode: each sample's tok/s ÷ (the copy "
        "bandwidth probed in the same process just before and after it ÷ the weight bytes streamed per token: "
        f"{streamed / 1e9:.2f}G parameters, every decoder linear + the untied head), median over the samples. "
        "Median bandwidth around the decode samples per phase: "
        + ", ".join(f"{x['label']} {x['phase_bw']:.1f} GB/s" for x in rows) + ".",
        "", "The reference's vision runs all 27 SigLIP blocks + post-LN, as the official code does (jvlm runs the "
        "25 it needs); its connector is jvlm's plain module in the same dtype; its follow-up TTFT = its vision "
        "time + a prefill of the whole longer conversation (the remote code has no cache across calls). "
        "Reference figures are single runs where stated in the JSON (`samples_*`).", ""]

    jv = [x for x in rows if x["kind"] == "jvlm"]
    if jv and refs:
        lines += ["## Ratios (same run)", "",
                  "| jvlm format | vision speed-up | prefill speed-up | TTFT ratio | follow-up TTFT s "
                  "| decode b=1 speed-up | b=8 / b=1 | decode b=1 % of floor | decode after the image speed-up "
                  "| peak RSS / (weights + KV) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in jv:
            budget = x["weight_bytes"] + x.get("kv_peak_bytes", 0)
            x["rss_ratio"], x["rss_ratio_net"] = x["peak_rss"] / budget, (x["peak_rss"] - x["rss_before_load"]) / budget
            lines.append(
                f"| {x['fmt']} | {ref_vision / x['vision_s_per_crop']:.2f}× | {x['prefill_tok_s'] / ref_prefill:.2f}× "
                f"| {x['ttft_s'] / ref_ttft:.2f} | {x['follow_up_ttft_s']:.2f} | {x['decode_b1_tok_s'] / ref_b1:.2f}× "
                f"| {_b8_ratio(x):.1f}× | {x['decode_floor_frac']:.0%} "
                f"| {x.get('decode_image_tok_s', nan) / ref_image_decode:.2f}× "
                f"| {x['rss_ratio']:.2f} ({x['rss_ratio_net']:.2f}) |")
        lines += ["", "Speed-ups are against the reference's best dtype for each figure "
                  f"(vision {ref_vision:.2f} s/crop, prefill {ref_prefill:.0f} tok/s, TTFT {ref_ttft:.1f} s, "
                  f"decode {ref_b1:.2f} tok/s, after the image {ref_image_decode:.2f} tok/s). "
                  "b=8 / b=1: the median over pairs of samples taken one right after "
                  "the other (the host's bandwidth drifts between phases). "
                  "KV = the most KV-cache bytes alive at once (the engine's prefix "
                  "cache + the new request's cache); in parentheses the same ratio without the interpreter's own "
                  "footprint before loading (Python + torch).", ""]
        best = max(jv, key=lambda x: x["decode_b1_tok_s"])
        checks = [
            ("decode b=1 ≥ 3× the reference's best", best["decode_b1_tok_s"] / ref_b1 >= 3,
             f"{best['decode_b1_tok_s'] / ref_b1:.2f}×"),
            ("decode b=1 ≥ 70% of its bandwidth floor", best["decode_floor_frac"] >= 0.7,
             f"{best['decode_floor_frac']:.0%}"),
            ("decode b=8 aggregate ≥ 5× b=1", _b8_ratio(best) >= 5, f"{_b8_ratio(best):.1f}×"),
            ("vision ≥ 1.5× the reference's best", ref_vision / best["vision_s_per_crop"] >= 1.5,
             f"{ref_vision / best['vision_s_per_crop']:.2f}×"),
            ("prefill ≥ 1.5× the reference's best", best["prefill_tok_s"] / ref_prefill >= 1.5,
             f"{best['prefill_tok_s'] / ref_prefill:.2f}×"),
            ("TTFT ≤ 0.5× the reference's best", best["ttft_s"] / ref_ttft <= 0.5, f"{best['ttft_s'] / ref_ttft:.2f}×"),
            ("follow-up TTFT ≤ 1.5 s", best["follow_up_ttft_s"] <= 1.5, f"{best['follow_up_ttft_s']:.2f} s"),
            ("peak RSS ≤ 1.2× (weights + KV)", best["rss_ratio"] <= 1.2,
             f"{best['rss_ratio']:.2f}× ({best['rss_ratio_net']:.2f}× without the interpreter)"),
            ("run under 10 minutes", total_s < 600, f"{total_s / 60:.1f} min"),
        ]
        lines += [f"## Targets (jvlm {best['fmt']}, this run)", ""]
        lines += [f"- {'met' if ok else '**missed**'}: {name}: {value}" for name, ok, value in checks] + [""]
    noisy = [p for p, r in results.items() if r.get("others_cpu_share", 0) > 0.1]
    if noisy:
        lines += [f"Other processes took >10% of the CPUs during some timed sections of: {', '.join(noisy)}; "
                  "compare ratios, not absolute figures.", ""]
    errors = {p: r["error"] for p, r in results.items() if "error" in r}
    for p, e in errors.items():
        lines.append(f"- {p} failed: {e}")
    for p, r in results.items():
        if "skipped" in r:
            lines.append(f"- {p} not measured: {r['skipped']}")
    return "\n".join(lines) + "\n"


def render_quality(results: dict, command: str) -> str:
    lines = ["## Error of each format against float32 (full-size geometry, random weights)", "",
             f"- command: `{command}`; date: {datetime.date.today().isoformat()}",
             "- prompts: the 800×600 image prompt and four text prompts, each teacher-forced on float32's greedy "
             "16-token continuation", "",
             "| format | final hidden states rel. error (max / mean) | logits rel. error (max / mean) "
             "| top-1 agreement (min / mean) | image features rel. error |", "|---|---|---|---|---|"]
    for phase, r in results.items():
        if "error" in r:
            lines.append(f"| {phase} | failed: {r['error']} | | | |")
        elif "hidden_rel" in r:
            lines.append(f"| {r['format']} | {r['hidden_rel']['max']:.4f} / {r['hidden_rel']['mean']:.4f} "
                         f"| {r['logits_rel']['max']:.4f} / {r['logits_rel']['mean']:.4f} "
                         f"| {r['top1_agreement_min']:.1%} / {r['top1_agreement']['mean']:.1%} "
                         f"| {r.get('features_rel', {}).get('max', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jvlm bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
