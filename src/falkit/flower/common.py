"""What the ServerApp and the ClientApps share: the run's config, the record formats, and
the declaration of every server-bound payload with its audit (DESIGN.md §8).

A client sends the server only
* `train`: its weights (the global model's keys and shapes), the FL algorithm's declared
  uplink (SCAFFOLD: c_k⁺ − c_k per parameter; FedNova: the scalar a_k) and its labeled count;
* `query.stats`: the scalars its strategy declares in `server_stats` (FairFAL: γ_k);
* FAST's first pass (`query.select`): the embeddings of its initial labeled set G_k^0 with
  their labels (the shared bank, paper §IV-C), as many as it reports labeled;
* `query.info`, `query.select`, `query.restore`, `evaluate`: counts (pool size, data shape,
  labeled count, per-class correct/total on its test data).
With `simulation-metrics = true` a `diagnostics` record may add what needs the true labels
(selected indices and labels, strategy diagnostics, class histograms, the test labels and
scores the AUC needs); `audit` rejects
anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from falkit import config as config_mod
from falkit.al.base import Strategy
from falkit.config import Config
from falkit.errors import ConfigError
from falkit.fl.algorithms import FedAvg, State

TRAIN, EVALUATE = "train", "evaluate"
INFO, STATS, SELECT, RESTORE = "query.info", "query.stats", "query.select", "query.restore"

INFO_KEYS = ("partition-id", "pool", "num-train", "num-classes", "in-channels", "image-size",
             "test")
SELECT_KEYS = ("labeled", "queried", "waiting")  # waiting: labels people still owe
FAST_KEYS = ("trained-on", "dim", "cached")  # FAST's passes: counts and the embedding size
EVAL_KEYS = ("correct", "total")
NUM_EXAMPLES = "num-examples"


class PrivacyViolation(RuntimeError):
    """A client's reply carries something its method does not declare."""


@dataclass
class Options:
    """The Flower-side settings of a run (the App's run config beside the falkit config)."""

    simulation_metrics: bool = False
    round_timeout: float = 600.0
    node_wait: float = 120.0
    overwrite: bool = False


# the App's own keys (beside falkit's settings) and their defaults
FLOWER_KEYS: dict[str, Any] = {"simulation-metrics": False, "round-timeout": 600.0,
                               "node-wait": 120.0, "overwrite": False}
# conveniences: a falkit TOML config (a file on every machine, or the TOML text itself), a
# preset, and "k=v k=v" overrides, as `falkit run FILE --preset P k=v ...`
CONVENIENCE_KEYS = ("config", "preset", "overrides")


def setting_keys() -> dict[str, Any]:
    """Every falkit setting as a run-config key (dotted, as in `falkit run k=v`) with its
    default."""
    return config_mod.flatten(config_mod.to_dict(Config()))


def load_config(run_config: dict[str, Any]) -> tuple[Config, Options]:
    """The falkit config and the Flower Options of a run config. Every falkit setting is a
    key of its own (`fl.rounds`, `strategy`, `partition.alpha`, ...; "" = not set);
    `config` (a TOML file path or the TOML text itself), `preset` and `overrides` work as
    in `falkit run`, under the keys; an unknown key is an error."""
    known = setting_keys()
    settings: dict[str, Any] = {}
    for key, value in run_config.items():
        if key in FLOWER_KEYS or key in CONVENIENCE_KEYS:
            continue
        if key not in known:
            raise ConfigError(f"run config key {key!r} is neither a falkit setting nor one "
                              f"of {', '.join([*FLOWER_KEYS, *CONVENIENCE_KEYS])}")
        if value != "":
            settings[key] = value
    source = str(run_config.get("config", "") or "")
    inline = "=" in source or "\n" in source  # the TOML itself, not a path
    preset = str(run_config.get("preset", "") or "") or None
    overrides = config_mod.parse_overrides(str(run_config.get("overrides", "") or "").split())
    cfg = config_mod.load(None if inline else (source or None), preset,
                          {**overrides, **settings}, text=source if inline else None)
    opts = Options(**{k.replace("-", "_"): type(d)(run_config.get(k, d))
                      for k, d in FLOWER_KEYS.items()})
    return cfg, opts


def app_config_toml() -> str:
    """The `[tool.flwr.app.config]` section of falkit's Flower App: the App's own keys, the
    conveniences, and every falkit setting under its dotted name ("" = falkit's default,
    shown in the comment), so `flwr run --run-config "fl.rounds=5"` can set each."""
    lines = ["[tool.flwr.app.config]",
             "# true: clients also send what needs true labels (selected indices and their "
             "labels,", "# queried-class histograms, strategy diagnostics, class counts per "
             "client,", "# test labels and scores for the AUC) - simulation only",
             "simulation-metrics = false",
             "round-timeout = 600.0  # seconds to wait for the replies of one round",
             "node-wait = 120.0  # seconds to wait for partition.num_clients SuperNodes",
             "overwrite = false  # replace an unfinished run directory of the same name",
             "# a falkit TOML config (a file path on the server and every site, or the TOML "
             "text),", "# a preset and \"k=v k=v\" overrides, as `falkit run FILE --preset P "
             "k=v ...`", 'config = ""', 'preset = ""', 'overrides = ""',
             "# every falkit setting (\"\" = its default, as in the comment); they win over "
             "config/preset/overrides"]
    for key, default in setting_keys().items():
        shown = "none" if default is None else json.dumps(default)
        lines.append(f'{key} = ""  # {shown}')
    return "\n".join(lines) + "\n"


# -- records ------------------------------------------------------------------------------
def state_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})


def record_state(record: ArrayRecord, device: torch.device | str = "cpu") -> State:
    """The tensors of a received record, on `device` (the receiving engine's: a message
    carries NumPy arrays, which always arrive on the CPU)."""
    # copy: the arrays decoded from a message are read-only
    return {k: torch.from_numpy(np.array(v.numpy())).to(device) for k, v in record.items()}


def array_record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.array(v.numpy()) for k, v in record.items()}


def json_config(**values: Any) -> ConfigRecord:
    """A ConfigRecord of JSON texts (nested dicts, None and exact floats survive)."""
    return ConfigRecord({k: json.dumps(v) for k, v in values.items()})


def config_json(record: ConfigRecord, key: str, default: Any = None) -> Any:
    return json.loads(str(record[key])) if key in record else default


# -- declarations and audit ---------------------------------------------------------------
def declared(strategy: Strategy, algorithm: FedAvg, simulation_metrics: bool
             ) -> dict[str, dict[str, tuple[str, ...]]]:
    """Per message type: record name -> the keys it may hold ("*" for the model's keys,
    "*params" for parameter arrays, "bank" for FAST's labeled-embedding bank)."""
    stats = tuple(getattr(strategy, "server_stats", ()))
    train: dict[str, tuple[str, ...]] = {
        "model": ("*",), "metrics": (NUM_EXAMPLES, *algorithm.uplink_scalars)}
    if algorithm.uplink_arrays:
        train["uplink"] = ("*params",)
    select: dict[str, tuple[str, ...]] = {"query": SELECT_KEYS}
    if strategy.initial_query == "fast":  # FAST's passes (ALGORITHMS.md §6, paper §IV-C)
        select = {"query": (*SELECT_KEYS, *FAST_KEYS), "bank": ("bank",)}
    out = {INFO: {"info": INFO_KEYS}, STATS: {"stats": stats},
           SELECT: select, RESTORE: {"query": SELECT_KEYS}, TRAIN: train,
           EVALUATE: {"eval": EVAL_KEYS}}
    if simulation_metrics:
        out[INFO]["diagnostics"] = ("class-counts", "classes")
        out[SELECT]["diagnostics"] = ("record", "queried-classes", "weak-row")
        out[EVALUATE]["diagnostics"] = ("labels", "probs")  # the AUC needs every score
    return out


def audit(message_type: str, content: RecordDict, allowed: dict[str, dict[str, tuple[str, ...]]],
          model: State, params: list[str]) -> None:
    """Raise PrivacyViolation unless `content` holds only declared records and keys, model
    arrays of the global model's shapes and scalar (or per-class count) metrics."""
    spec = allowed.get(message_type)
    if spec is None:
        raise PrivacyViolation(f"undeclared message type {message_type!r}")
    for name, record in content.items():
        if name not in spec:
            raise PrivacyViolation(f"{message_type}: undeclared record {name!r}")
        keys = spec[name]
        if isinstance(record, ArrayRecord):
            if keys == ("*",):
                if set(record) != set(model):
                    raise PrivacyViolation(f"{message_type}: {name} is not the model's arrays")
                like = model
            elif keys == ("*params",):
                if not set(record) <= set(params):
                    raise PrivacyViolation(f"{message_type}: {name} holds non-parameter arrays")
                like = model
            elif keys == ("bank",):  # FAST: the labeled embeddings (n × d) and their labels
                shapes = {k: tuple(a.shape) for k, a in record.items()}
                if set(shapes) != {"z", "y"} or len(shapes["z"]) != 2 or \
                        shapes["y"] != shapes["z"][:1]:
                    raise PrivacyViolation(f"{message_type}: {name} is not an embedding bank "
                                           f"(z: n × d, y: n), got {shapes}")
                continue
            else:
                raise PrivacyViolation(f"{message_type}: {name} may not carry arrays")
            for k, arr in record.items():
                if tuple(arr.shape) != tuple(like[k].shape):
                    raise PrivacyViolation(f"{message_type}: {name}[{k}] has shape "
                                           f"{tuple(arr.shape)}, the model's is "
                                           f"{tuple(like[k].shape)}")
        elif isinstance(record, MetricRecord):
            extra = set(record) - set(keys)
            if extra:
                raise PrivacyViolation(f"{message_type}: undeclared values {sorted(extra)} in "
                                       f"{name}")
            for k, v in record.items():
                if isinstance(v, list) and k not in EVAL_KEYS:
                    raise PrivacyViolation(f"{message_type}: {name}[{k}] is a list, not a "
                                           "scalar")
        elif isinstance(record, ConfigRecord):
            if name != "diagnostics":
                raise PrivacyViolation(f"{message_type}: {name} may not carry config values")
            extra = set(record) - set(keys)
            if extra:
                raise PrivacyViolation(f"{message_type}: undeclared diagnostics "
                                       f"{sorted(extra)}")
        else:  # pragma: no cover - RecordDict holds only these three kinds
            raise PrivacyViolation(f"{message_type}: unknown record type of {name!r}")
