"""The per-request sampler (temperature 0 = argmax); its parameters live in types.py."""

from __future__ import annotations

import torch

from .types import SamplingParams

__all__ = ["Sampler", "SamplingParams"]


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def adjust(self, logits: torch.Tensor, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
        """Penalties applied to raw float32 logits (V,)."""
        p = self.params
        vocab = logits.shape[0]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({t for t in prompt_ids + generated if t < vocab}), dtype=torch.long)
            if seen.numel():
                vals = logits[seen]
                logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and generated:
            ids = torch.tensor([t for t in generated if t < vocab], dtype=torch.long)
            counts = torch.bincount(ids, minlength=vocab).to(logits.dtype)
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def __call__(self, logits: torch.Tensor, prompt_ids: list[int], generated: list[int]) -> int:
        p = self.params
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            logits = self.adjust(logits.clone(), prompt_ids, generated)
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
            logits = logits.index_put((order[drop],), torch.tensor(float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
