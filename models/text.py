"""Prompt encoding: a transformers text encoder (UMT5 for Wan) and its tokenizer.

Embeddings follow Wan's pipeline: tokens beyond each prompt's length are zeroed, and the
sequence is padded to `text_len`, so cross-attention K/V depend only on the prompt.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5EncoderModel

from streamrt.errors import InputError


@contextlib.contextmanager
def quiet_loading():
    """transformers' "Loading weights" bar off while a model loads: the commands draw
    their own progress, and a bar per load of a 1 MB model is noise."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


class PromptError(InputError):
    """A prompt the tokenizer cannot represent (e.g. words outside a closed vocabulary)."""


def word_tokenizer(vocab: list[str], text_len: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a closed vocabulary (for the tiny embedded models)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    specials = ["<pad>", "<unk>", "</s>"]
    words = specials + [w for w in dict.fromkeys(vocab) if w not in specials]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=text_len,
    )


class TextEncoder:
    """Tokenizer + encoder producing `[B, text_len, dim]` prompt embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer, text_len: int) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.text_len = text_len
        unk = getattr(tokenizer, "unk_token", None)
        vocab = tokenizer.get_vocab()
        # A closed word vocabulary maps unknown words to <unk>: refuse them instead.
        self.closed_vocab = (
            sorted(w for w in vocab if not w.startswith("<")) if len(vocab) < 5000 else None
        )
        self.unk_id = vocab.get(unk) if unk is not None else None

    @classmethod
    def from_pretrained(
        cls, path: str | Path, text_len: int, dtype=torch.float32, device="cpu"
    ) -> TextEncoder:
        path = Path(path)
        with quiet_loading():
            model = UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype)
        model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        return cls(model, tokenizer, text_len)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")

    def check(self, prompt: str) -> None:
        """Raise `PromptError` listing unknown words when the vocabulary is closed."""
        if self.closed_vocab is None:
            return
        words = self.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(prompt.lower())
        unknown = [w for w, _ in words if w not in self.tokenizer.get_vocab()]
        if unknown:
            raise PromptError(
                f"prompt {prompt!r} has words outside this model's vocabulary: {unknown}. "
                f"Known words: {' '.join(self.closed_vocab)}"
            )

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Checked prompts to embeddings `[B, text_len, dim]` (inference)."""
        for p in prompts:
            self.check(p)
        return self.embed(prompts)

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask `[B, text_len]` (padded, truncated), on the CPU."""
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Embeddings `[B, text_len, dim]` with padding zeroed; keeps gradients (training)."""
        device = next(self.model.parameters()).device
        ids, mask = (t.to(device) for t in self.token_ids(prompts))
        hidden = self.model(ids, mask).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype)
