"""Checks across sections for a run on your own model, data or training loop: keys that
cannot apply to what the configuration names are refused, each with the reason."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedforge.config.base import changed

if TYPE_CHECKING:
    from fedforge.config.run import RunConfig

READING_KEYS = (
    *("format", "label", "labels", "features", "categorical", "category_buckets"),
    *("scale", "image_size", "channels"),
)
BUILTIN_DATA_KEYS = ("dataset", "alpha", "beta", "devices")
BUILTIN_MODEL_KEYS = ("name", "hidden", "channels", "dense", "inputs", "classes")
CENTRAL_METRICS = ("test_accuracy", "test_loss")


def user_code(config: RunConfig) -> dict[str, str]:
    """The import paths the configuration names, by key."""
    keys = {
        "workload": config.workload,
        "model.factory": config.model.factory,
        "data.loader": config.data.loader,
        "client.train": config.client.train,
    }
    return {k: v for k, v in keys.items() if v is not None}


def workload_problems(config: RunConfig) -> list[str]:
    """Your model, data and training loop against the rest of the configuration."""
    out = data_problems(config) + model_problems(config) + loop_problems(config)
    out += config.server.stop_when.problems() + stop_problems(config)
    if config.workload is not None:
        for key in ("model.factory", "data.loader", "client.train"):
            if key in user_code(config):
                out.append(
                    f"{key} cannot be set with workload: the workload object names the "
                    "model, the data and the training loop"
                )
    return out


def data_problems(config: RunConfig) -> list[str]:
    data, out = config.data, []
    own = not data.builtin or config.workload is not None
    if own:
        for key in changed(data, "sites"):
            if key in BUILTIN_DATA_KEYS:
                out.append(f"data.{key} describes a built-in dataset; this run reads its own data")
        for key in changed(config.partition, "num_clients"):
            out.append(
                f"partition.{key} splits a built-in dataset; with your own data each "
                "site is one client"
            )
        if data.sites and config.partition.num_clients != 100:
            out.append("partition.num_clients: with data.sites, each file is one client")
    else:
        for key in changed(data, "dataset"):
            if key in READING_KEYS or key == "test":
                out.append(
                    f"data.{key} reads data files: name them in data.sites (simulation) or "
                    "--data (a deployed client)"
                )
    if data.loader is not None:
        for key in changed(data, "loader"):
            if key in READING_KEYS:
                out.append(f"data.{key} applies to the built-in readers, not to data.loader")
    if config.attack.kind == "backdoor" and (own or data.dataset == "synthetic"):
        out.append("attack.kind = 'backdoor' needs image data (mnist5k or digits)")
    return out


def model_problems(config: RunConfig) -> list[str]:
    model, out = config.model, []
    if model.factory is not None or config.workload is not None:
        by = "model.factory" if model.factory is not None else "workload"
        out += [
            f"model.{key} configures a built-in model; {by} builds this one"
            for key in changed(model, "factory")
            if key in BUILTIN_MODEL_KEYS
        ]
    elif model.options:
        out.append("model.options are the keyword arguments of model.factory: set it")
    if model.name != "cnn" and model.dense != 512:
        out.append("model.dense applies to model.name = 'cnn'")
    if model.channels is not None and model.name not in ("cnn", "resnet"):
        out.append("model.channels applies to model.name = 'cnn' or 'resnet'")
    if model.name == "cnn" and model.channels is not None and len(model.channels) != 2:
        out.append("model.channels: the FedAvg CNN has two convolutions: give two widths")
    if model.hidden != [200, 200] and model.name != "mlp":
        out.append("model.hidden applies to model.name = 'mlp'")
    return out


def loop_problems(config: RunConfig) -> list[str]:
    """A training function (``client.train``) against the algorithm, DP-SGD and the
    vectorized runtime; a workload object is checked when it is built."""
    client = config.client
    if client.train is None:
        return [
            f"client.{key} describes client.train: set it"
            for key in ("train_proximal", "train_metrics")
            if key in changed(client, "train")
        ]
    out = []
    name = config.algorithm.name
    if name == "fedprox" and config.algorithm.mu > 0 and not client.train_proximal:
        out.append(
            "client.train cannot run algorithm.name = 'fedprox' unless it adds "
            "config.proximal(model) (mu/2 ||w - w_global||^2) to its loss: do so and set "
            "client.train_proximal = true"
        )
    if "train_loss" in client.train_metrics or len(client.train_metrics) > 64:
        out.append("client.train_metrics: at most 64 names, beside train_loss (always recorded)")
    refusal = loop_refusal(name)
    if refusal is not None:
        out.append(
            f"client.train cannot run algorithm.name = {name!r}: {refusal}, which a "
            "training function's own loop does not expose"
        )
    if config.privacy.mode == "sample":
        out.append(
            "client.train cannot run with privacy.mode = 'sample': DP-SGD clips and noises "
            "each example's gradient inside the built-in loop (use 'central' or 'local')"
        )
    if config.runtime.backend == "vectorized":
        out.append(
            "runtime.backend = 'vectorized' batches the built-in local program across clients; "
            "a training function runs its own loop one client at a time (use workers or auto)"
        )
    return out


def stop_problems(config: RunConfig) -> list[str]:
    """Early stopping needs its metric to be recorded."""
    stop = config.server.stop_when
    if stop.metric is None:
        return []
    out = []
    if stop.metric.startswith("fed_eval.") and config.evaluation.fraction == 0:
        out.append(
            f"server.stop_when.metric = {stop.metric!r} needs federated evaluation: "
            "set evaluation.fraction > 0"
        )
    own = not config.data.builtin or config.workload is not None
    named = config.workload is not None  # a workload object may bring its own test set
    if stop.metric in CENTRAL_METRICS and own and config.data.test is None and not named:
        out.append(
            f"server.stop_when.metric = {stop.metric!r} needs a central test set "
            "(data.test), or use a fed_eval metric"
        )
    if config.asynchronous.mode != "off":
        out.append("server.stop_when applies to synchronous rounds (asynchronous.mode = 'off')")
    return out


def loop_refusal(algorithm: str) -> str | None:
    """Why a training function cannot run the named algorithm (its class says)."""
    from fedforge.algorithms.ditto import Ditto
    from fedforge.algorithms.fedavg import FedAvg
    from fedforge.algorithms.fednova import FedNova
    from fedforge.algorithms.fedper import FedPer
    from fedforge.algorithms.fedprox import FedProx
    from fedforge.algorithms.fedrep import FedRep
    from fedforge.algorithms.qfedavg import QFedAvg
    from fedforge.algorithms.scaffold import Scaffold

    classes: dict[str, type[FedAvg]] = {
        "fedavg": FedAvg,
        "fedprox": FedProx,
        "scaffold": Scaffold,
        "fednova": FedNova,
        "qfedavg": QFedAvg,
        "fedper": FedPer,
        "fedrep": FedRep,
        "ditto": Ditto,
    }
    return classes[algorithm].loop_refusal
