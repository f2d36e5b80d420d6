"""Prompts that ask a language model for one label, and parsing of its answer.

Shared by the generative backends: ``causal-lm`` scores each label's first token
after the prompt, ``openai`` asks a chat server for the label. Few-shot examples
come from the server's train split, balanced across classes and deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhlm_app.data.datasets import Dataset, Split

MAX_EXAMPLE_CHARS = 300  # keeps few-shot prompts short: the examples only show the format and the labels
MAX_TEXT_CHARS = 2000  # the text asked about (AG News averages ~240 characters)


@dataclass(frozen=True)
class LabelPrompt:
    """The instruction, the label names and the few-shot examples of one task."""

    class_names: list[str]
    examples: list[tuple[str, int]]  # (text, class index)

    def instruction(self) -> str:
        names = ", ".join(self.class_names[:-1]) + f" or {self.class_names[-1]}" if len(self.class_names) > 1 else self.class_names[0]
        return f"Classify the topic of the text as {names}. Answer with the topic only."

    def completion(self, text: str) -> str:
        """A plain-text prompt for base models; the label follows 'Topic:' after a space."""
        shots = "".join(f"Text: {t}\nTopic: {self.class_names[y]}\n\n" for t, y in self.examples)
        return f"{self.instruction()}\n\n{shots}Text: {_flat(text)}\nTopic:"

    def chat(self, text: str) -> list[dict[str, str]]:
        """Chat messages for instruction-tuned models: examples as earlier turns."""
        messages = [{"role": "system", "content": self.instruction()}]
        for t, y in self.examples:
            messages += [{"role": "user", "content": f"Text: {t}"}, {"role": "assistant", "content": self.class_names[y]}]
        return messages + [{"role": "user", "content": f"Text: {_flat(text)}"}]

    def parse(self, answer: str) -> int | None:
        """The class an answer names: exact name first, else the only class it mentions; else None."""
        said = _words(answer)
        for c, name in enumerate(self.class_names):
            if said == _words(name):
                return c
        mentioned = {c for c, name in enumerate(self.class_names) if _mentions(said, name)}
        return mentioned.pop() if len(mentioned) == 1 else None


def label_prompt(cfg: dict[str, Any], dataset: Dataset) -> LabelPrompt:
    """The run config's prompt: the dataset's class names and ``oracle-few-shot`` train examples per class."""
    examples = few_shot_examples(dataset.train, cfg.oracle_few_shot, dataset.num_classes, cfg.seed)
    return LabelPrompt(list(dataset.class_names), examples)


def few_shot_examples(split: Split, per_class: int, num_classes: int, seed: int) -> list[tuple[str, int]]:
    """``per_class`` train texts of each class, interleaved by class, chosen with ``seed``."""
    order = np.random.default_rng([seed, 11]).permutation(len(split.labels))
    picked: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for i in order:
        c = int(split.labels[i])
        if len(picked[c]) < per_class:
            picked[c].append(int(i))
    return [(_clip(split.texts[picked[c][k]]), c) for k in range(per_class) for c in range(num_classes) if k < len(picked[c])]


def _flat(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Whitespace collapsed, cut at a word boundary after ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _clip(text: str) -> str:
    return _flat(text, MAX_EXAMPLE_CHARS)


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _mentions(said: str, name: str) -> bool:
    """Whether the answer contains the class name, or one part of a name like 'Sci/Tech'."""
    parts = [_words(name), *(_words(p) for p in re.split(r"[/&]| and ", name) if _words(p))]
    return any(re.search(rf"\b{re.escape(p)}\b", said) for p in parts if p)
