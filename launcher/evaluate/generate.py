"""``heft generate CHECKPOINT --prompt TEXT``: sample a continuation, the first sanity check after training.

No KV cache: each new token reruns the (at most seq_length) context through the model. That is
quadratic, and fine for the few hundred tokens a sanity check needs; serving belongs to the export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 100
    temperature: float = 0.0
    """0: greedy (the most likely token); otherwise softmax(logits / temperature) sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")


def continue_tokens(model, prompt: list[int], sampling: Sampling, stop_at_eos: bool = True):
    """Yield new token ids one at a time. Only real vocabulary entries are drawn (never padding)."""
    generator = torch.Generator().manual_seed(sampling.seed)
    tokens = list(prompt)
    for _ in range(sampling.max_new_tokens):
        context = torch.tensor([tokens[-model.seq_length:]], dtype=torch.long)
        logits = model.logits(context)[0, -1, :model.vocab_size].cpu()
        if sampling.temperature == 0:
            token = int(torch.argmax(logits))
        else:
            logits = logits / sampling.temperature
            if sampling.top_k:
                kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        if stop_at_eos and token == model.tokenizer.eos_id:
            return
        tokens.append(token)
        yield token


def print_continuation(model, prompt_text: str, prompt: list[int], sampling: Sampling) -> None:
    """Print the prompt, then each new piece of text as soon as it decodes whole (a multi-byte
    character split over tokens waits for its last byte)."""
    print(prompt_text, end="", flush=True)
    new: list[int] = []
    shown = ""
    for token in continue_tokens(model, prompt, sampling):
        new.append(token)
        text = model.tokenizer.decode(new)  # whole-text decode: multi-byte characters come out whole
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(model.tokenizer.decode(new)[len(shown):], flush=True)
