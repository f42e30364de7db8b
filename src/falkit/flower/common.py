"""What the ServerApp and the ClientApps share: the run's config, the record formats, and
the declaration of every server-bound payload with its audit (DESIGN.md §8).

A client sends the server only
* `train`: its weights (the global model's keys and shapes), the FL algorithm's declared
  uplink (SCAFFOLD: c_k⁺ − c_k per parameter; FedNova: the scalar a_k) and its labeled count;
* `query.stats`: the scalars its strategy declares in `server_stats` (FairFAL: γ_k);
* FAST's first pass (`query.select`): the embeddings of its initial labeled set G_k^0 with
  their labels (the shared bank, paper §IV-C), as many as it reports labeled;
* `query.info`, `query.select`, `query.restore`, `evaluate`: counts (pool size, data shape,
  labeled count, per-class correct/total on its test data); `query.info` also the site's
  falkit version and config schema, the name of the dataset it holds and a SHA-256 of its
  train and test arrays (the run's data.json; nothing can be read back from a digest).
With `simulation-metrics = true` a `diagnostics` record may add what needs the true labels
(selected indices and labels, strategy diagnostics, class histograms, the test labels and
scores the AUC needs); `audit` rejects
anything else.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from falkit import __version__
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
EVAL_KEYS = ("correct", "total")
NUM_EXAMPLES = "num-examples"
# query.info's `site` record: versions, and what the site holds (a partition of the configured
# dataset in simulation, or its own data) with the digests of its arrays
SITE_KEYS = ("falkit", "schema", "kind", "dataset", "train", "test")
CONFIG_RECORDS = ("diagnostics", "site")  # the only ConfigRecords a client may send


def schema() -> str:
    """12 hex digits over every falkit setting and its default: a server and a site whose
    falkit reads the run config differently do not start a run together."""
    return hashlib.sha256(json.dumps(setting_keys(), sort_keys=True).encode()).hexdigest()[:12]


def versions() -> dict[str, str]:
    return {"falkit": __version__, "schema": schema()}


def site_config(cfg: Config, dataset: str) -> Config:
    """The config a run on sites that hold their own data is named and reported by, on the
    server and on every site alike: the sites' dataset, partition.method = sites, no long
    tail (a site's data are used as they are)."""
    out = copy.deepcopy(cfg)
    out.data.dataset, out.partition.method, out.data.rho = dataset, "sites", 1.0
    return out


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
        if value == "" and key not in known:
            continue  # declared by an App with a plug-in this machine lacks: not set
        if key not in known:
            try:  # falkit's own message: which keys are valid where the key went wrong
                config_mod._field_type(Config(), key)
            except ConfigError as e:
                raise ConfigError(f"run config: {e}; or one of the App's own keys "
                                  f"{', '.join([*FLOWER_KEYS, *CONVENIENCE_KEYS])}") from None
            raise ConfigError(f"run config key {key!r} is a section, not a setting: give "
                              f"its settings ({key}.NAME=value)") from None
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


def parse_run_config(text: str) -> dict[str, Any]:
    """A `flwr run --run-config` value ("k=v k=v" in TOML, or a .toml file) as flwr reads it,
    over the App's defaults: what the ServerApp would get. A key the App does not declare,
    which Flower refuses with only "Invalid run configuration", is falkit's one-line error."""
    from flwr.common.config import parse_config_args

    try:
        given = parse_config_args([text])
    except Exception as e:  # noqa: BLE001 - flwr's click/TOML errors, as one line
        raise ConfigError(f"--flower: {getattr(e, 'message', e)}") from None
    run_config: dict[str, Any] = {**FLOWER_KEYS, **dict.fromkeys(CONVENIENCE_KEYS, ""),
                                  **dict.fromkeys(setting_keys(), "")}
    for key in given:
        if key not in run_config:
            load_config({key: given[key]})  # raises falkit's message for this key
    return {**run_config, **given}


def app_config_toml(methods: bool = True) -> str:
    """The `[tool.flwr.app.config]` section of falkit's Flower App: the App's own keys, the
    conveniences, and every falkit setting under its dotted name ("" = falkit's default,
    shown in the comment), so `flwr run --run-config "fl.rounds=5"` can set each.
    `methods=False`: without the methods' option sections (the shipped App's: `app_dir`
    adds those of every registered method, plug-ins included)."""
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
    own = set() if methods else set(config_mod.method_sections())
    for key, default in setting_keys().items():
        if key.split(".", 1)[0] in own:
            continue
        shown = "none" if default is None else json.dumps(default)
        lines.append(f'{key} = ""  # {shown}')
    return "\n".join(lines) + "\n"


def app_dir() -> Path:
    """The Flower App directory to hand to `flwr run`: falkit's shipped App (its components
    and falkit's own settings) with a run-config key for every option of every registered
    method (built-ins, and the plug-ins installed here) - so a method added as one file, or
    installed as a plug-in, is a native run-config key without editing the App. Written
    once per set of keys under $FALKIT_CACHE (or ~/.cache/falkit)/flower-app-<hash>/."""
    from falkit.flower import APP_DIR
    from falkit.models.encoders import default_cache_dir

    shipped = (APP_DIR / "pyproject.toml").read_text(encoding="utf-8")
    head = shipped[: shipped.index("\n[tool.flwr.app.config]") + 1]
    text = head + app_config_toml()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    for base in (default_cache_dir().parent, Path(tempfile.gettempdir()) / "falkit"):
        out = base / f"flower-app-{digest}"
        target = out / "pyproject.toml"
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            return out
        try:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".pyproject.{os.getpid()}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)  # atomic: another process may be writing the same
            return out
        except OSError:
            continue  # a read-only cache: the next place
    raise ConfigError("cannot write the Flower App (no writable $FALKIT_CACHE, "
                      "~/.cache/falkit or temporary directory)")


# -- records ------------------------------------------------------------------------------
LAYOUT = "layout"  # a packed state's names, dtypes and shapes (JSON, as uint8)


def state_record(state: State) -> ArrayRecord:
    """A state dict packed into one flat array per dtype plus its layout. Flower sends every
    Array of a message as objects of their own, each an HTTP request that the SuperLink
    stores: a 46-tensor model was ~95 objects per message, about 4 s of a deployment round
    on 2 cores (benchmarks/FLOWER_RESULTS.md); packed it is 5-7."""
    layout, groups = [], {}
    for k, v in state.items():
        a = v.detach().cpu().contiguous().numpy()
        layout.append([k, a.dtype.str, list(a.shape)])
        groups.setdefault(a.dtype.str, []).append(a.reshape(-1))
    text = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)
    return ArrayRecord({LAYOUT: Array(text.copy()),
                        **{dt: Array(np.concatenate(parts)) for dt, parts in groups.items()}})


def record_layout(record: ArrayRecord) -> list[tuple[str, str, tuple[int, ...]]]:
    """The (name, dtype, shape) of every tensor of a packed state, checked against the
    record's arrays; PrivacyViolation if the record is not a packed state."""
    try:
        raw = record[LAYOUT].numpy() if LAYOUT in record else None
        layout = json.loads(bytes(raw)) if raw is not None and raw.dtype == np.uint8 else None
        entries = [(str(k), str(dt), tuple(int(n) for n in shape)) for k, dt, shape in layout]
    except (TypeError, ValueError):
        entries = None
    if entries is None or len({k for k, _, _ in entries}) != len(entries):
        raise PrivacyViolation("not a packed state (no readable layout)")
    sizes: dict[str, int] = {}
    for _, dt, shape in entries:
        sizes[dt] = sizes.get(dt, 0) + int(np.prod(shape, dtype=np.int64))
    arrays = {k: record[k] for k in record if k != LAYOUT}
    if set(arrays) != set(sizes) or any(
            np.dtype(arrays[dt].dtype).str != dt or tuple(arrays[dt].shape) != (n,)
            for dt, n in sizes.items()):
        raise PrivacyViolation("a packed state's arrays do not match its layout")
    return entries


def record_state(record: ArrayRecord, device: torch.device | str = "cpu") -> State:
    """The tensors of a received packed state, on `device` (the receiving engine's: a
    message carries NumPy arrays, which always arrive on the CPU)."""
    flat = {dt: record[dt].numpy() for dt in record if dt != LAYOUT}
    at = dict.fromkeys(flat, 0)
    out: State = {}
    for k, dt, shape in record_layout(record):
        n = int(np.prod(shape, dtype=np.int64))
        # copy: the arrays decoded from a message are read-only
        part = np.array(flat[dt][at[dt]:at[dt] + n]).reshape(shape)
        at[dt] += n
        out[k] = torch.from_numpy(part).to(device)
    return out


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
    "*params" for parameter arrays, "=name:ndim,..." for a strategy's initial-pass arrays:
    exactly those, with one number of rows)."""
    stats = tuple(strategy.server_stats)
    train: dict[str, tuple[str, ...]] = {
        "model": ("*",), "metrics": (NUM_EXAMPLES, *algorithm.uplink_scalars)}
    if algorithm.uplink_arrays:
        train["uplink"] = ("*params",)
    # cycle 0's passes may send the strategy's declared scalars and arrays (FAST's bank)
    select: dict[str, tuple[str, ...]] = {"query": (*SELECT_KEYS, *strategy.initial_values)}
    for name, arrays in strategy.initial_uploads.items():
        select[name] = tuple(f"={a}:{ndim}" for a, ndim in arrays.items())
    out = {INFO: {"info": INFO_KEYS, "site": SITE_KEYS}, STATS: {"stats": stats},
           SELECT: select, RESTORE: {"query": SELECT_KEYS}, TRAIN: train,
           EVALUATE: {"eval": EVAL_KEYS}}
    if simulation_metrics:
        out[INFO]["diagnostics"] = ("class-counts", "classes")
        out[SELECT]["diagnostics"] = ("record", "queried-classes", "diag")
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
            if keys in (("*",), ("*params",)):
                try:
                    shapes = {k: shape for k, _, shape in record_layout(record)}
                except PrivacyViolation as e:
                    raise PrivacyViolation(f"{message_type}: {name} is {e}") from None
                if keys == ("*",) and set(shapes) != set(model):
                    raise PrivacyViolation(f"{message_type}: {name} is not the model's arrays")
                if keys == ("*params",) and not set(shapes) <= set(params):
                    raise PrivacyViolation(f"{message_type}: {name} holds non-parameter arrays")
                for k, shape in shapes.items():
                    if shape != tuple(model[k].shape):
                        raise PrivacyViolation(f"{message_type}: {name}[{k}] has shape "
                                               f"{shape}, the model's is "
                                               f"{tuple(model[k].shape)}")
                continue
            elif keys and all(k.startswith("=") for k in keys):  # a strategy's arrays
                want = dict(k[1:].split(":") for k in keys)  # name -> ndim
                shapes = {k: tuple(a.shape) for k, a in record.items()}
                if set(shapes) != set(want) or any(len(shapes[a]) != int(n)
                                                   for a, n in want.items()) or \
                        len({s[0] for s in shapes.values()}) != 1:
                    spec = ", ".join(f"{a}: {n}-D" for a, n in want.items())
                    raise PrivacyViolation(f"{message_type}: {name} is not what {name} may "
                                           f"hold ({spec}, one number of rows), got {shapes}")
                continue
            else:
                raise PrivacyViolation(f"{message_type}: {name} may not carry arrays")
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
            if name not in CONFIG_RECORDS:
                raise PrivacyViolation(f"{message_type}: {name} may not carry config values")
            extra = set(record) - set(keys)
            if extra:
                raise PrivacyViolation(f"{message_type}: undeclared {name} values "
                                       f"{sorted(extra)}")
        else:  # pragma: no cover - RecordDict holds only these three kinds
            raise PrivacyViolation(f"{message_type}: unknown record type of {name!r}")
