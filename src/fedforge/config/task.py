"""What is trained on what: the data (built-in, files or a loader), its partition over
clients, and the model (built-in or a factory)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedforge.config.base import Section

IMPORT_PATH = "a 'module:attribute' import path (a module beside the configuration, or installed)"


def check_import_path(value: str | None) -> str | None:
    if value is None:
        return None
    module, sep, attribute = value.partition(":")
    if not sep or not module.strip() or not attribute.strip():
        raise ValueError(f"{value!r} is not {IMPORT_PATH}, e.g. 'models:make_cnn'")
    return value


class DataConfig(Section):
    """The data: a built-in dataset (all offline), your files (``sites``: one file or
    directory per client, read by the built-in readers), or your loader function."""

    dataset: Literal["mnist5k", "digits", "synthetic"] = "mnist5k"
    alpha: float = Field(1.0, ge=0, description="synthetic only: model heterogeneity")
    beta: float = Field(1.0, ge=0, description="synthetic only: feature heterogeneity")
    devices: int = Field(30, ge=1, description="synthetic only: number of devices")
    sites: list[str] = Field(
        default_factory=list,
        description="simulation: one data file or directory per client (CSV, Parquet, .npz, "
        "an image folder), relative to project_dir; a deployed client names its own (--data)",
    )
    test: str | None = Field(None, description="central test set: a file or directory")
    loader: str | None = Field(
        None, description="your data: 'module:function' taking a Site, returning one site's data"
    )
    format: Literal["auto", "csv", "parquet", "npz", "images"] = Field(
        "auto", description="how to read a site's file (auto: by suffix; a directory: images)"
    )
    label: str = Field("label", description="csv, parquet: the label column")
    labels: list[str] = Field(
        default_factory=list,
        description="the label values (text) or class folder names, in class order; empty: "
        "labels are integers 0..classes-1",
    )
    features: list[str] = Field(
        default_factory=list,
        description="csv, parquet: the feature columns in order (default: every column but "
        "the label, in the file's order)",
    )
    categorical: list[str] = Field(
        default_factory=list,
        description="csv, parquet: text columns, one-hot encoded into hashed buckets",
    )
    category_buckets: int = Field(16, ge=1, description="csv, parquet: buckets per category")
    scale: Literal["site", "none"] = Field(
        "site",
        description="csv, parquet: standardize numeric columns with each site's own mean and "
        "standard deviation (learned on the site, never shared), or leave them",
    )
    image_size: list[int] = Field(
        default_factory=lambda: [28, 28], description="images: height and width after resizing"
    )
    channels: Literal[1, 3] = Field(1, description="images: 1 (grayscale) or 3 (RGB)")

    @field_validator("loader")
    @classmethod
    def _loader_path(cls, value: str | None) -> str | None:
        return check_import_path(value)

    @property
    def builtin(self) -> bool:
        """True when the data is a built-in dataset (no files, no loader)."""
        return self.loader is None and not self.sites

    @property
    def meaning(self) -> dict[str, str]:
        """The reading settings that give the data its meaning (what a feature or a class
        is): part of the architecture fingerprint that server and clients compare."""
        if self.builtin:
            return {"data.dataset": self.dataset}
        if self.loader is not None:  # your loader gives the data its meaning
            return {}
        keys = (
            *("format", "label", "labels", "features", "categorical", "category_buckets"),
            *("scale", "image_size", "channels"),
        )
        return {f"data.{k}": str(getattr(self, k)) for k in keys}


class PartitionConfig(Section):
    """How training examples are split across clients (built-in datasets)."""

    scheme: Literal["iid", "dirichlet", "shards", "quantity", "natural"] = "dirichlet"
    num_clients: int = Field(100, ge=1)
    alpha: float = Field(0.5, gt=0, description="dirichlet: concentration")
    shards_per_client: int = Field(2, ge=1, description="shards: label shards per client")
    exponent: float = Field(1.5, gt=0, description="quantity: Pareto tail exponent")


class ModelConfig(Section):
    """The model: a built-in architecture, or your factory."""

    name: Literal["mlp", "logistic", "cnn", "resnet"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [200, 200], description="mlp widths")
    channels: list[int] | None = Field(
        None, description="cnn: its two convolutions' channels (32, 64); resnet: stage widths"
    )
    dense: int = Field(512, ge=1, description="cnn: units of the fully connected layer")
    factory: str | None = Field(
        None, description="your model: 'module:function' returning a torch.nn.Module"
    )
    options: dict[str, bool | int | float | str | list[int] | list[float] | list[str]] = Field(
        default_factory=dict, description="keyword arguments of the factory"
    )
    inputs: list[int] | None = Field(
        None, description="built-in models: shape of one example (default: from the data)"
    )
    classes: int | None = Field(
        None, ge=2, description="built-in models: number of classes (default: from the data)"
    )

    @field_validator("factory")
    @classmethod
    def _factory_path(cls, value: str | None) -> str | None:
        return check_import_path(value)
