"""Prompt ids for the text-conditioned rewards, id for id as each model's reference code makes them.

A reward's text tower only means what it was trained to mean on the ids its reference tokeniser produced, so
egrpo reproduces that tokeniser rather than calling whatever transformers' tokenizer of the folder does:

    model        reference                                                             here
    clip         OpenAI CLIP's clip.tokenize(prompts, truncate=True)                   ClipPrompts
                 (clip/simple_tokenizer.py)
    hpsv2        open_clip's tokenize (open_clip/tokenizer.py), as HPSv2's scoring     ClipPrompts
                 calls it
    pickscore    transformers' CLIP tokenizer of laion/CLIP-ViT-H-14, as PickScore's  TransformersPrompts
                 own code calls it (padding=True, truncation=True, max_length=77)
    imagereward  BLIP's BertTokenizer (bert-base-uncased plus [DEC] and [ENC]),        TransformersPrompts
                 padding="max_length", truncation, max_length=35, as ImageReward calls it

Why CLIP and HPSv2 need more than transformers' tokenizer: OpenAI's and open_clip's tokenisers clean a prompt
before BPE (ftfy's fix_text, HTML entities unescaped twice, runs of whitespace collapsed, lower case), and
transformers' does not, so "&amp;" would become "&", "amp", ";" instead of "&". And LAION's tokenizer files
(HPSv2's CLIP-ViT-H-14) register "!", id 0, as the pad token, which transformers then matches as a special
token inside prompts: "wow!!" would end in two pad ids where the reference has the BPE token "!!</w>". So
`ClipPrompts` runs the reference's cleaning and pre-tokenising regex in Python and takes only the BPE merges
from the folder's tokenizer files (the same vocabulary and merges the reference ships); it then lays out the
ids as the reference does: start-of-text, at most 75 BPE ids, end-of-text (kept when truncating), 0 up to the
context length of 77.

PickScore and ImageReward are trained and scored with transformers' tokenizers, quirks included ("!" is
PickScore's pad id too), so `TransformersPrompts` calls those exactly as their reference code does.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import ftfy
import regex
import torch
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase

# prompts -> {"input_ids", "attention_mask"}: (B, L) int64 CPU tensors, what a text tower takes.
PromptTokenizer = Callable[[list[str]], dict[str, torch.Tensor]]

# The context length of every CLIP text tower egrpo scores with (OpenAI CLIP, open_clip, PickScore).
CLIP_CONTEXT_LENGTH = 77

# The start- and end-of-text strings that each reference's regex matches *inside* a prompt and maps to the
# special ids: OpenAI's simple_tokenizer.py names them one way, open_clip's tokenizer.py another.
OPENAI_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")

# Both references' pre-tokenising regex after the specials, applied case-insensitively as they do.
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clean_clip_prompt(text: str) -> str:
    """A prompt as OpenAI CLIP's and open_clip's tokenisers clean it before BPE: ftfy's fix_text (mojibake,
    and an HTML entity in plain text), HTML entities unescaped twice more, whitespace runs collapsed to one
    space and stripped, lower case.

    OpenAI's (and HPSv2's copy of open_clip) collapse whitespace with regex's `\\s+`, open_clip 3 with
    str.split(); they differ only on U+001C-U+001F, which ftfy and html.unescape have already removed."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


@cache
def _byte_to_unicode() -> dict[int, str]:
    """The byte -> character table of CLIP's (GPT-2's) byte-level BPE: printable bytes map to themselves,
    the others to code points from 256 up, so no vocabulary entry holds whitespace or control characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }


class ClipPrompts:
    """CLIP prompt ids exactly as OpenAI CLIP's `clip.tokenize(..., truncate=True)` (specials
    OPENAI_CLIP_SPECIALS) or open_clip's `tokenize` (OPEN_CLIP_SPECIALS) make them, with the BPE of a
    transformers CLIP tokenizer loaded from the model's folder (see the module docstring for why).

    Rows are [start, BPE ids of the cleaned prompt (at most context_length - 2), end, 0, ...]; the attention
    mask is 1 up to and including the end token. The zeros (the id of "!" in CLIP's vocabulary) are what the
    references pad with; CLIP's causal text tower never lets the end token, where it pools, see them."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        specials: tuple[str, str] = OPENAI_CLIP_SPECIALS,
        context_length: int = CLIP_CONTEXT_LENGTH,
    ) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not isinstance(backend.model, BPE):
            raise ValueError(f"{type(tokenizer).__name__} is not a byte-level BPE (CLIP) tokenizer")
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the CLIP tokenizer has no start- or end-of-text token")
        if context_length < 2:
            raise ValueError(
                f"context_length must leave room for the start and end tokens, got {context_length}"
            )
        self.bpe: BPE = backend.model
        self.start_id: int = tokenizer.bos_token_id
        self.end_id: int = tokenizer.eos_token_id
        self.context_length = context_length
        self.special_ids = dict(zip(specials, (self.start_id, self.end_id), strict=True))
        self.pattern = regex.compile(
            "|".join(regex.escape(s) for s in specials) + "|" + _WORDS, regex.IGNORECASE
        )

    def encode(self, prompt: str) -> list[int]:
        """The BPE ids of one cleaned prompt, without start, end or truncation."""
        table = _byte_to_unicode()
        ids: list[int] = []
        for word in self.pattern.findall(clean_clip_prompt(prompt)):
            if word in self.special_ids:
                ids.append(self.special_ids[word])
            else:
                ids.extend(token.id for token in self.bpe.tokenize("".join(table[b] for b in word.encode())))
        return ids

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        input_ids = torch.zeros(len(prompts), self.context_length, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        # a GRPO batch holds each prompt once per image of its group: clean and encode each only once
        encoded = {prompt: self.encode(prompt) for prompt in dict.fromkeys(prompts)}
        for row, prompt in enumerate(prompts):
            ids = [self.start_id, *encoded[prompt][: self.context_length - 2], self.end_id]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclass(frozen=True)
class TransformersPrompts:
    """A transformers tokenizer called as a reward's reference code calls it: padding True (to the longest
    prompt) or "max_length", truncation to `max_length` (special tokens kept)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    padding: bool | str = True

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            prompts, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
