"""Federated LoRA fine-tuning of a language model (the ``fedforge[llm]`` extra): the
``[lora]`` section, and what it cannot compose with."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from fedforge.config.base import Section, changed

if TYPE_CHECKING:
    from fedforge.config.run import RunConfig


class LoraConfig(Section):
    """A language model (MiniLM classification or a small GPT-2's next-token prediction) on
    Python's own docstrings, fine-tuned with LoRA adapters; off unless ``model`` or
    ``pretrained`` is set."""

    model: Literal["minilm", "gpt2-small"] | None = Field(
        None,
        description="minilm: the packaged all-MiniLM-L6-v2 encoder (classification); "
        "gpt2-small: a small GPT-2 initialized from the seed (next-token prediction)",
    )
    pretrained: str | None = Field(
        None, description="any local Hugging Face checkpoint directory instead of model"
    )
    task: Literal["classify", "next_token"] | None = Field(
        None, description="default: classify for minilm, next_token for gpt2-small"
    )
    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0, description="LoRA scale is alpha / rank")
    targets: list[str] = Field(
        default_factory=list,
        description="adapted modules (default: query/value for BERT, c_attn for GPT-2)",
    )
    aggregation: Literal["fedit", "ffa", "exact", "hetero", "fedsa"] = Field(
        "fedit",
        description="fedit: A and B averaged; ffa: A frozen, B averaged; exact: mean of "
        "B_k A_k, residual folded into the base; fedsa: A averaged, B kept by each client",
    )
    exact_factors: Literal["svd", "mean"] = Field(
        "svd",
        description="exact: the new adapters are the mean's best rank-r part (svd) or the "
        "clients' mean factors (mean, FedEx-LoRA's); the residual goes to the base either way",
    )
    clients: int = Field(10, ge=1, le=10, description="sites (one per package or modules)")
    seq_len: int = Field(64, ge=2, le=512, description="tokens per example")
    examples: int | None = Field(None, ge=1, description="at most this many per client")
    test_examples: int | None = Field(None, ge=1, description="at most this many to test")
    decoder_layers: int = Field(4, ge=1, le=48, description="gpt2-small: layers")
    decoder_width: int = Field(128, ge=8, le=4096, description="gpt2-small: width")
    decoder_heads: int = Field(4, ge=1, le=64, description="gpt2-small: attention heads")
    memory_limit_mb: int | None = Field(
        None,
        ge=1,
        description="refuse a run whose estimated peak exceeds this (default: "
        "the memory available)",
    )

    @property
    def enabled(self) -> bool:
        return self.model is not None or self.pretrained is not None


def lora_problems(config: RunConfig) -> list[str]:
    """The ``[lora]`` section against the rest: what does not compose is refused."""
    lora = config.lora
    if not lora.enabled:
        return [f"lora.{k} applies with lora.model or lora.pretrained" for k in changed(lora, "")]
    out = []
    if config.rl is not None:
        out.append("[lora] and [rl] configure two different runs: keep one")
    if lora.model is not None and lora.pretrained is not None:
        out.append("lora.model and lora.pretrained: name one base model")
    if lora.pretrained is not None and lora.task is None:
        out.append("lora.pretrained: set lora.task (classify or next_token)")
    if lora.model is None or lora.model == "minilm" or lora.task == "classify":
        out += [
            f"lora.{k} shapes the gpt2-small decoder"
            for k in ("decoder_layers", "decoder_width", "decoder_heads")
            if k in changed(lora, "")
        ]
    if lora.model == "minilm" and lora.task == "next_token":
        out.append("lora.model = 'minilm' is an encoder: its task is classify")
    if lora.model == "gpt2-small" and lora.task == "classify":
        out.append("lora.model = 'gpt2-small' is a decoder: its task is next_token")
    for key in ("workload", "model.factory", "data.loader"):
        if key in _user_code(config):
            out.append(f"{key} cannot be set with [lora]: the LoRA run builds its model and data")
    out += [
        f"partition.{k} splits a built-in dataset; a LoRA run has lora.clients sites"
        for k in changed(config.partition, "")
    ]
    if config.data.sites or config.data.test is not None:
        out.append("data.sites and data.test: a LoRA run's text is Python's docstrings")
    if config.algorithm.name not in ("fedavg", "fedprox"):
        out.append(
            f"algorithm.name = {config.algorithm.name!r} with [lora]: use fedavg or fedprox "
            "(lora.aggregation picks how adapters combine; fedsa is FedPer on B)"
        )
    if config.runtime.backend == "vectorized":
        out.append(
            "runtime.backend = 'vectorized' with [lora]: the vectorized runtime stacks every "
            "parameter per client (a copy of the base each); LoRA's batched trainer "
            "(fedforge.llm.batched) is not wired into it yet: use sequential or workers"
        )
    if config.privacy.mode == "sample":
        out.append("privacy.mode = 'sample' (DP-SGD through Opacus) is not wired for LoRA models")
    return out + _mode_problems(config)


def _mode_problems(config: RunConfig) -> list[str]:
    mode = config.lora.aggregation
    out = []
    if mode == "hetero":
        out.append(
            "lora.aggregation = 'hetero' is not wired into runs yet: clients of different ranks "
            "send records of different shapes, and a round's records share one spec (the math "
            "is fedforge.llm.modes.aggregate); use exact for one rank"
        )
    if mode == "fedsa" and config.algorithm.name != "fedavg":
        out.append("lora.aggregation = 'fedsa' keeps B like FedPer's head: use algorithm fedavg")
    if mode != "exact":
        if config.lora.exact_factors != "svd":
            out.append("lora.exact_factors applies to lora.aggregation = 'exact'")
        return out
    why = "exact's aggregate is the mean of each client's product B_k A_k, not of the records"
    if config.aggregation.kind == "secure_sum":
        out.append(f"lora.aggregation = 'exact' cannot run with secure aggregation: {why}")
    elif config.aggregation.kind != "mean":
        out.append(
            f"lora.aggregation = 'exact' cannot run with aggregation.kind = "
            f"{config.aggregation.kind!r}: a robust rule on factor rows is not a robust {why[7:]}"
        )
    if config.privacy.mode in ("central", "local", "distributed"):
        out.append(
            f"lora.aggregation = 'exact' cannot run with privacy.mode = "
            f"{config.privacy.mode!r}: the noise is calibrated to a sum of clipped records, "
            f"and {why}"
        )
    s = config.server
    if s.optimizer != "sgd" or (s.lr or 1.0) != 1.0 or s.momentum != 0:
        out.append(
            "lora.aggregation = 'exact' replaces the model by the exact mean (server SGD at "
            "lr 1, no momentum): a server optimizer step on factors is not defined for it"
        )
    return out


def _user_code(config: RunConfig) -> dict[str, str]:
    from fedforge.config.workload import user_code

    return user_code(config)
