"""Typed experiment configuration: dataclasses, TOML load/save, presets, key=value overrides.

Defaults are the FairFAL paper protocol (ALGORITHMS.md §1, §3). Every knob a paper names
keeps that name. Validation turns impossible settings into one-line `ConfigError`s.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import numbers
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from falkit import options as options_mod
from falkit.errors import ConfigError

# the declared type of a setting that holds comma-separated names: a TOML list of strings
# (or a Python list, through falkit.run) is accepted too and joined with commas
NAMES = "comma-separated names"
Names = Annotated[str, NAMES]


@dataclass
class DataConfig:
    dataset: str = "fmnist"  # a name of `falkit list`, or npz:/imagefolder:/csv:<path>
    # searched first; then $FALKIT_DATA, ~/.cache/falkit, /usr/share/datasets
    data_root: str | None = None
    rho: float | None = 20.0  # global long tail n_max / n_min; None = keep the dataset as it is
    profile: str = "exp"  # exp | step
    # an official validation split (MedMNIST's): ignore | train (train on train+val) |
    # test (evaluate on val instead of test, for tuning)
    val_split: str = "ignore"
    # per-channel mean/std: dataset = the dataset's own constants | code = those of the
    # FairFAL authors' code where they differ (CIFAR-100-LT: ImageNet's)
    normalization: str = "dataset"


@dataclass
class PartitionConfig:
    # dirichlet_balanced | dirichlet | dirichlet_flwr | iid | shards | pathological | json
    # | sites (Flower: each client a site with its own data, set by the ServerApp)
    # | natural (the data says each sample's site: falkit.data.sources)
    method: str = "dirichlet_balanced"
    num_clients: int = 10  # clients (sites) the training set is split among
    alpha: float = 0.1  # Dirichlet concentration: small = extreme non-IID
    min_partition_size: int = 10  # dirichlet, dirichlet_flwr (flwr-datasets semantics)
    self_balancing: bool = False  # dirichlet, dirichlet_flwr
    classes_per_client: int = 2  # pathological: exactly this many classes per client
    file: str | None = None  # json
    shards_per_client: int = 2  # shards (McMahan et al.; a client may hold 1..2s classes)
    # the seed of the partition; None = the run's `seed`. The FairFAL code partitions with
    # dir_balance(seed=0) for every run seed (one client x class matrix; the long-tail
    # subsample still follows the run seed)
    seed: int | None = None
    # feature shift: each client's images through its own transform of this family
    # (falkit.data.shift): none | rotate | color | noise | blur; its strength in (0, 1];
    # shift_test: the test images too (each through a client's transform drawn for it)
    shift: str = "none"
    shift_strength: float = 0.5  # how strong each client's transform is, in (0, 1]
    shift_test: bool = False  # shift the test images too


@dataclass
class BudgetConfig:
    fraction: float = 0.05  # q: per-cycle budget as a fraction of the training set
    # fairfal: int(round(N,-2)*q/K) per client | proportional (KAFAL): ceil(q*|pool_k|)
    rule: str = "fairfal"
    cycles: int = 9  # trainings; cycles-1 queries (5 % -> 45 %)


@dataclass
class FLConfig:
    algorithm: str = "fedavg"  # the FL algorithm (falkit list): fedavg, fedprox, ...
    rounds: int = 100  # FL rounds per cycle
    local_epochs: int = 5  # epochs over its labeled data per client per round
    batch_size: int = 64  # local SGD mini-batch
    lr: float = 0.01  # local SGD learning rate
    momentum: float = 0.9  # local SGD momentum
    weight_decay: float = 1e-5  # local SGD weight decay
    lr_decay: float = 0.1  # lr x lr_decay once int(lr_decay_at * rounds) rounds are done
    lr_decay_at: float = 0.75  # the fraction of rounds after which lr decays
    # which round decays first, r counted from 0: paper = r + 1 > int(lr_decay_at * R)
    # ("after 75 % of the rounds": 75 rounds at lr, 25 decayed) | code = r > int(lr_decay_at
    # * R) (the FairFAL code's `r > 75` in util/misc.py: 76 at lr, 24 decayed) | at = r + 1
    # >= int(m * R) (FAST-official's int(rnd / step) with Flower's rounds from 1: the
    # int(m * R)-th round already decays)
    lr_decay_rule: str = "paper"
    # a multi-step schedule instead: fractions m of R, lr x lr_decay once more after each
    # int(m * R) rounds (FAST-official: 0.25, 0.5, 0.75, 1); empty = the one lr_decay_at
    lr_milestones: Names = ""
    fraction: float = 1.0  # participating clients per round
    reset: str = "random"  # random: fresh init every cycle | continue: warm start
    mu: float = 0.01  # FedProx
    # FedAvg weights: labeled = each client's count of training labels (FedAvg, FairFAL;
    # FAST with weak labels: its whole pool, FAST-official's num_samples) | uniform (every
    # participating client counts the same: FAST's text, Eq. 2)
    weighting: str = "labeled"
    # falkit.flower: a client that fails or times out mid-run; continue: the run goes on
    # with the clients that answer | stop: the run ends with an error (finished cycles kept)
    on_client_failure: str = "stop"


@dataclass
class LocalModelConfig:
    # the local model of @L baselines and LoGo: last_round = the client's weights after its
    # last local update of the cycle (the FairFAL authors' baseline code) | scratch = trained
    # from scratch on its labels (LoGo's own paper); FairFAL always uses scratch, KAFAL and
    # IFAL last_round
    mode: str = "last_round"
    lr: float = 0.01  # SGD lr of a local model trained from scratch
    epochs: int = 50  # epochs of a local model trained from scratch
    decay_epoch: int = 37  # lr x 0.1 from this epoch (lr_step = batch: mini-batch) on
    lr_step: str = "epoch"  # epoch | batch (the reference code's per-batch MultiStepLR)
    stop_accuracy: float = 0.99  # stop early once the accuracy reaches this ...
    stop_check: str = "train"  # ... running training accuracy | eval (the reference's pass)


@dataclass
class ModelConfig:
    backbone: str = "cnn4"  # the network (falkit list), or frozen:<encoder>
    # dropout on the backbone's penultimate features (the classifier's input) while
    # training, p of dropping each; 0 = none (every preset). What MC-dropout strategies
    # (bald) sample at query time
    dropout: float = 0.0
    # backbone = "frozen:<encoder spec>" (any of fast.encoder's: pixels, pca[:dim], hf:...,
    # open_clip:..., timm:..., torchscript:...): a frozen encoder embeds every site's images
    # once (cached on the site's disk) and this head is trained on the embeddings:
    # linear | mlp (one hidden ReLU layer of head_hidden units)
    head: str = "linear"
    head_hidden: int = 256  # hidden units of the mlp head
    encode_batch: int = 64  # images per encoder forward pass


@dataclass
class RuntimeConfig:
    device: str = "cpu"  # cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and aggregation stay fp32)
    channels_last: bool = True  # NHWC memory layout for convolutions
    threads: int = 0  # intra-op threads with workers = 1; 0 = torch's default
    # clients trained (and inference chunks run) concurrently, one intra-op thread each:
    # on small CPUs this beats one process with several OpenMP threads per op
    workers: int = 1
    tune_allocator: bool = True  # glibc: keep freed buffers (no per-step page faults)
    eval_batch: int = 128  # larger batches are slower on small CPUs (cache)
    eval_every: int = 0  # 0 = evaluate once per cycle; n = also every n rounds
    # clients with equally many labels train as one batched computation (torch.func.vmap
    # over stacked weights): auto = on a GPU only (on this CPU one at a time is faster,
    # benchmarks/RESULTS.md) | on | off
    batch_clients: str = "auto"
    # the global model after each cycle as a state dict (models/cycle_<c>.pt, loaded by
    # falkit.models.saved.load_model): all | last | none
    save_models: str = "all"


@dataclass
class Config:
    name: str = ""  # run directory name; empty = derived from the settings
    seed: int = 0  # the run seed: every random stream (data, partition, init, query)
    strategy: str = "random"  # the query strategy, e.g. fairfal, entropy@G (falkit list)
    out_dir: str = "runs"  # where run directories are written
    # who answers the queries: "simulated" (the dataset's labels) | "human" (people, through
    # per-client queues and `falkit label`; a run waits for their answers)
    oracle: str = "simulated"
    # experiment trackers fed with every cycle's (and round's) metrics: any of tensorboard,
    # mlflow, wandb, comma-separated or a TOML list (falkit.tracking)
    tracking: Names = ""
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    local_model: LocalModelConfig = field(default_factory=LocalModelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # ... and one section per registered method with options (a strategy's or an FL
    # algorithm's `options` dataclass, falkit.options): [fairfal], [fast], ... They are not
    # dataclass fields: `cfg.fairfal` reads them, `to_dict` lists them after the fields.

    def __post_init__(self) -> None:
        from falkit import registry  # lazily: the registries import this module

        self.__dict__["_sections"] = {name: cls() for name, cls in
                                      registry.option_sections().items()}

    def __getattr__(self, name: str) -> Any:  # only for names that are not attributes
        if "_sections" in self.__dict__:
            sections = self.sections()
            if name in sections:
                return sections[name]
        raise AttributeError(f"'Config' has no setting or section {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        sections = self.__dict__.get("_sections")
        if sections is not None and name in self.sections():  # cfg.fairfal = FairFALConfig()
            if type(value) is not type(sections[name]):
                raise TypeError(f"cfg.{name} must be a {type(sections[name]).__name__}")
            sections[name] = value
        else:
            super().__setattr__(name, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return to_dict(self) == to_dict(other)

    def sections(self) -> dict[str, Any]:
        """Method name -> its options section, for every registered method with options (a
        method registered after this config was made, a plug-in named later, gets its
        defaults)."""
        from falkit import registry

        sections = self.__dict__["_sections"]
        for name, cls in registry.option_sections().items():
            if name not in sections:
                sections[name] = cls()
        return sections

    def section(self, name: str) -> Any:
        """The options section of method `name`, or None if it has none."""
        return self.sections().get(name)

    def run_name(self) -> str:
        """`name`, or a readable name plus a short hash of every setting that changes the
        experiment, so that two different configs never share a run directory."""
        if self.name:
            return self.name
        alpha = f"{self.partition.alpha:g}"
        strategy = self.strategy.replace("@", "-").replace(":", "-")  # module:Class too
        dataset = self.data.dataset.replace(":", "-").replace("/", "-")[-40:].lstrip(".")
        return (f"{dataset}_{self.partition.method}_a{alpha}_{strategy}_s{self.seed}_"
                f"{self.settings_hash()}")

    def settings_hash(self) -> str:
        """6 hex digits over the run's identity (`identity`): the same experiment gets the
        same directory on any machine, device or thread layout, so it resumes there."""
        return hashlib.sha256(repr(sorted(identity(self).items())).encode()).hexdigest()[:6]


# The `quick` preset: the FairFAL protocol scaled to a 2-core CPU (docs/guide/running.md,
# "Presets").
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "fl.rounds": 3,
        "fl.local_epochs": 1,
        "fl.lr": 0.05,
        "fl.reset": "continue",
        "local_model.epochs": 10,
        "local_model.decay_epoch": 8,
        "budget.cycles": 5,
        "ifal.kd_epochs": 20,
    },
    # every choice of the authors' code where it differs from the papers' text
    # (docs/guide/running.md, "Fidelity"); combine with quick as --preset reference,quick
    "reference": {
        "fl.lr_decay_rule": "code",
        "data.normalization": "code",
        "partition.seed": 0,
        "fairfal.embedding_probs": "code",
        "local_model.mode": "last_round",
        "local_model.lr_step": "batch",
        "local_model.stop_check": "eval",
        "ifal.w1": "reference",
        "ifal.kd_keep": "last",
        "alfamix.head": "global",
        "fast.scope": "pooled",
        "fast.uncertainty": "norm",
        "fast.local_steps": 0,
        # FAST-official's training: FedAvg by num_samples, SGD lr 1e-3, weight decay 1e-4,
        # batch 128, RandomCrop(padding 4) + flip, lr x 0.1 at R/4, R/2, 3R/4
        "fast.weighting": "labeled",
        "fast.lr": 1e-3,
        "fast.weight_decay": 1e-4,
        "fast.batch_size": 128,
        "fast.crop_pad": 4,
        # ablation/utils.py get_learning_rate: lr x 0.1 ** int(rnd / (R/4)), rnd = 1..R, so
        # rounds 25, 50, 75 and the last one (100) each decay once more
        "fast.lr_milestones": "0.25,0.5,0.75,1",
        "fast.lr_decay_rule": "at",
        "fast.initial": 0.05,  # ablation/data.py: initial_labeled_ratio = 0.05
        "fast.pooled_budget": "code",
    },
}

# the valid values of falkit's own settings; a method's are its options' metadata
CORE_CHOICES = {
    "oracle": ("simulated", "human"),
    "data.profile": ("exp", "step"),
    "data.val_split": ("ignore", "train", "test"),
    "data.normalization": ("dataset", "code"),
    "partition.method": ("dirichlet_balanced", "dirichlet", "dirichlet_flwr", "iid", "shards",
                         "pathological", "json", "sites", "natural"),
    "partition.shift": ("none", "rotate", "color", "noise", "blur"),
    "model.head": ("linear", "mlp"),
    "budget.rule": ("fairfal", "proportional"),
    "fl.reset": ("random", "continue"),
    "fl.on_client_failure": ("stop", "continue"),
    "local_model.mode": ("scratch", "last_round"),
    "local_model.lr_step": ("epoch", "batch"),
    "local_model.stop_check": ("train", "eval"),
    "fl.weighting": ("labeled", "uniform"),
    "fl.lr_decay_rule": ("paper", "code", "at"),
    "runtime.precision": ("fp32", "bf16"),
    "runtime.batch_clients": ("auto", "on", "off"),
    "runtime.save_models": ("all", "last", "none"),
}


# every name of Config's own: a method may not take one as its section's name
CORE_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config (or one of its sections) as nested dicts; a Config's method sections come
    after its own fields."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, Config):
        out.update({name: dataclasses.asdict(sec) for name, sec in cfg.sections().items()})
    return out


def method_sections(kind: str | None = None) -> tuple[str, ...]:
    """The config sections that hold one method's options (derived from the registries;
    `kind`: only "strategy" or "fl_algorithm" methods): only the run's own methods'
    sections are part of its saved config and settings hash, so adding a method renames no
    existing run."""
    from falkit import registry

    return tuple(registry.option_sections(kind))


def own_sections(cfg: Config) -> tuple[str, ...]:
    """The method sections of the run's own strategy and FL algorithm."""
    from falkit import registry

    return (registry.strategy_class(cfg.strategy).name,
            registry.algorithm(cfg.fl.algorithm).name)


def choices() -> dict[str, tuple[Any, ...]]:
    """Every setting with a fixed set of values -> those values: falkit's own, the method
    names of the registries, and each method's options' choices (falkit.options)."""
    from falkit import registry

    out = dict(CORE_CHOICES)
    out["fl.algorithm"] = registry.method_names("fl_algorithm")
    for name, cls in registry.option_sections().items():
        out.update(options_mod.choices_of(name, cls))
    return out


def ranges() -> list[tuple[str, float | None, float | None, bool, bool]]:
    """(key, low, high, low inclusive, high inclusive) of every bounded numeric setting."""
    from falkit import registry

    out = list(CORE_RANGES)
    for name, cls in registry.option_sections().items():
        out += options_mod.ranges_of(name, cls)
    return out


def experiment_dict(cfg: Config) -> dict[str, Any]:
    """The config as a dict, without the option sections of other methods."""
    own, others = own_sections(cfg), set(cfg.sections())
    return {k: v for k, v in to_dict(cfg).items() if k not in others or k in own}


# settings that say where a run lives, where its data are read from, how it reacts to
# failures or on what hardware it computes, not what it computes (the data themselves are
# checked by their fingerprint, data.json; threads, workers, the device and batched clients
# can change float rounding)
NOT_IDENTITY = ("name", "out_dir", "tracking", "data.data_root", "fl.on_client_failure",
                "runtime.device", "runtime.threads", "runtime.workers", "runtime.eval_batch",
                "runtime.tune_allocator", "runtime.batch_clients", "runtime.save_models")
TRACKERS = ("tensorboard", "mlflow", "wandb")  # falkit.tracking's sinks


def tracker_names(cfg: Config) -> list[str]:
    """The trackers `tracking` names ("tensorboard,mlflow" or a TOML list)."""
    return [t.strip() for t in cfg.tracking.split(",") if t.strip()]

# settings added after runs were named: part of a run's identity only when not at these
# defaults, so existing run directories keep their names
ADDED_LATER = {"oracle": "simulated", "partition.shards_per_client": 2,
               "data.val_split": "ignore", "fl.lr_decay_rule": "paper",
               "ifal.kd_keep": "best", "data.normalization": "dataset",
               "partition.seed": None, "fl.lr_milestones": "",
               "fast.weighting": "labeled", "fast.lr": None, "fast.weight_decay": None,
               "fast.batch_size": None, "fast.crop_pad": None, "fast.lr_milestones": "",
               "fast.lr_decay_rule": "", "fast.pooled_budget": "all",
               "kafal.mix_partner": "shared",
               "kafal.mix_weights": "mixed", "model.dropout": 0.0,
               "partition.shift": "none", "partition.shift_strength": 0.5,
               "partition.shift_test": False, "model.head": "linear",
               "model.head_hidden": 256, "model.encode_batch": 64}
# a dataset given by path: its kind is identity, its path is not (data.json has the bytes)
_BY_PATH = ("npz:", "imagefolder:", "csv:")


def identity(cfg: Config) -> dict[str, Any]:
    """The settings that make a run this run (dotted keys): every setting but NOT_IDENTITY,
    the option sections of other strategies, and the path of a dataset given by path. The
    run name's hash and the check that a resumed run is the same run both use it."""
    d = flatten(experiment_dict(cfg))
    for key in NOT_IDENTITY:
        d.pop(key, None)
    for key, default in ADDED_LATER.items():  # at their default: run names from before stay
        if key in d and d[key] == default:
            d.pop(key)
    for kind in _BY_PATH:
        if str(d.get("data.dataset", "")).startswith(kind):
            d["data.dataset"] = kind
    return d


def strategy_options(cfg: Config) -> dict[str, Any]:
    """The config section named after the strategy (e.g. [fairfal]), as keyword options."""
    from falkit import registry

    section = cfg.section(registry.strategy_class(cfg.strategy).name)
    return dataclasses.asdict(section) if section is not None else {}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys: {"fl": {"lr": 0.1}} -> {"fl.lr": 0.1}. An
    empty dict stays a value ({"fl": {"lr": {}}} -> {"fl.lr": {}}): a table where a setting
    belongs is an error (`set_key`), not nothing."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _field_type(cfg: Any, dotted: str) -> tuple[Any, str, Any]:
    """(owner dataclass instance, attribute, declared type) for a dotted key; the type of a
    section is its dataclass. ConfigError if unknown."""
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        fields: list[str] = [f.name for f in dataclasses.fields(obj)]
        if isinstance(obj, Config):
            fields += list(obj.sections())
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{dotted}' (valid at {where}: {valid})")
        if isinstance(obj, Config) and part in obj.sections():
            if i == len(parts) - 1:
                return obj, part, type(obj.sections()[part])
        elif i == len(parts) - 1:
            return obj, part, typing.get_type_hints(type(obj), include_extras=True)[part]
        obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            setting = ".".join(parts[: i + 1])
            raise ConfigError(f"unknown config key '{dotted}': {setting} is a setting, not a "
                              f"section (give it a value, not a table)")
    raise AssertionError


def _describe(value: Any) -> str:
    """A value as an error message shows it: its TOML kind for arrays, tables, dates and
    times, short and on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table" if not value else f"a table {_short(repr(value))}"
    if isinstance(value, (list, tuple)):
        return f"an array {_short(repr(list(value)))}"
    for kind in (datetime.datetime, datetime.date, datetime.time):  # datetime is a date
        if isinstance(value, kind):
            return f"a {kind.__name__} {value.isoformat()}"
    return _short(repr(value))


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())  # one line whatever the repr
    return text if len(text) <= limit else text[: limit - 3] + "..."


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """A TOML value, a command-line string or a Python value (falkit.run) as the field's
    declared type. By that type alone: a string is parsed (the command line), a bool, int or
    float must be one (an int for a float, an integral float for an int) and a str a str (or
    a path); anything else (an array, a table, a date or time, a number for a string) is a
    one-line ConfigError, never a traceback or a silently different value."""
    names = typing.get_origin(typ) is Annotated and NAMES in typ.__metadata__
    if typing.get_origin(typ) is Annotated:
        typ = typing.get_args(typ)[0]
    args = typing.get_args(typ)
    optional = isinstance(typ, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), typ) if optional else typ
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, numbers.Integral)):  # "yes", "off", 1, 0
            text = str(value).lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
    elif base is int:
        if real and float(value).is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif base is float:
        if real:
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
            return os.fspath(value)
        if names and isinstance(value, (list, tuple)):
            if all(isinstance(v, str) for v in value):
                return ",".join(value)
            raise ConfigError(f"{key} must be str or a list of str, got {_describe(value)}")
    elif isinstance(base, type) and isinstance(value, base):
        return value
    what = "str or a list of str" if names else getattr(base, "__name__", str(base))
    raise ConfigError(f"{key} must be {what}, got {_describe(value)}")


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    owner, attr, typ = _field_type(cfg, dotted)
    if dataclasses.is_dataclass(typ):
        if isinstance(value, dict) and not value:
            return  # an empty [section]: nothing to set
        raise ConfigError(f"'{dotted}' is a section; set one of its keys, e.g. {dotted}.X")
    setattr(owner, attr, _coerce(value, typ, dotted))


def apply(cfg: Config, flat: dict[str, Any]) -> Config:
    for k, v in flat.items():
        set_key(cfg, k, v)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. partition.alpha=100)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load(path: str | Path | None = None, preset: str | None = None,
         overrides: dict[str, Any] | None = None, text: str | None = None) -> Config:
    """Defaults ← TOML file (or TOML `text`) ← preset (file key `preset` or argument) ←
    key=value overrides."""
    file_values: dict[str, Any] = {}
    if text is not None:
        try:
            file_values = flatten(tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"the inline config is not valid TOML: {e}") from None
    elif path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            file_values = flatten(tomllib.loads(p.read_text(encoding="utf-8")))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a TOML config (not UTF-8 text)") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    # a preset named in the file is its base (the file's own values win over it); the
    # --preset argument is applied on top of the file, so it can scale any config down
    file_preset = file_values.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise ConfigError(f"preset must be str (a preset's name, or names joined by commas), "
                          f"got {_describe(file_preset)}")
    file_presets, presets = preset_names(file_preset), preset_names(preset)
    _register_named(file_values, dict(overrides or {}))  # a plug-in's section, before use
    cfg = Config()
    for name in file_presets:  # a preset named in the file is its base
        apply(cfg, PRESETS[name])
    apply(cfg, file_values)
    for name in presets:
        apply(cfg, PRESETS[name])
    apply(cfg, dict(overrides or {}))
    validate(cfg)
    return cfg


def check_name(name: str, what: str = "name") -> str:
    """A run (or output folder) name must be one plain path component: a name is never a
    way to reach (and, with --overwrite, replace) another directory."""
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name
            or "\\" in name or "\0" in name):
        raise ConfigError(f"{what} must be a single folder name (no '/', not empty, not "
                          f"starting with '.'), got {name!r}")
    return name


# (key, low, high, low inclusive, high inclusive): every numeric setting's valid range;
# None = unbounded on that side. Every float must also be finite (no nan, no inf).
CORE_RANGES: tuple[tuple[str, float | None, float | None, bool, bool], ...] = (
    ("seed", 0, None, True, True),
    ("data.rho", 1, None, True, True),
    ("partition.num_clients", 1, None, True, True),
    ("partition.alpha", 0, None, False, True),
    ("partition.min_partition_size", 0, None, True, True),
    ("partition.classes_per_client", 1, None, True, True),
    ("partition.shards_per_client", 1, None, True, True),
    ("partition.seed", 0, None, True, True),
    ("partition.shift_strength", 0, 1, False, True),
    ("budget.fraction", 0, 1, False, False),
    ("budget.cycles", 1, None, True, True),
    ("fl.rounds", 1, None, True, True),
    ("fl.local_epochs", 1, None, True, True),
    ("fl.batch_size", 2, None, True, True),
    ("fl.lr", 0, None, False, True),
    ("fl.momentum", 0, 1, True, False),
    ("fl.weight_decay", 0, None, True, True),
    ("fl.lr_decay", 0, 1, False, True),
    ("fl.lr_decay_at", 0, 1, True, True),
    ("fl.fraction", 0, 1, False, True),
    ("fl.mu", 0, None, True, True),
    ("model.dropout", 0, 1, True, False),
    ("model.head_hidden", 1, None, True, True),
    ("model.encode_batch", 1, None, True, True),
    ("local_model.lr", 0, None, False, True),
    ("local_model.epochs", 1, None, True, True),
    ("local_model.decay_epoch", 0, None, True, True),
    ("local_model.stop_accuracy", 0, 1, False, True),
    ("runtime.threads", 0, None, True, True),
    ("runtime.workers", 1, None, True, True),
    ("runtime.eval_batch", 1, None, True, True),
    ("runtime.eval_every", 0, None, True, True),
)


FLOAT32_MAX = 3.4028234663852886e38


def _range_text(lo: float | None, hi: float | None, lo_in: bool, hi_in: bool) -> str:
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def preset_names(text: str | None) -> list[str]:
    """`quick`, `reference,quick`: presets applied left to right (a later one wins)."""
    names = [n.strip() for n in str(text or "").split(",") if n.strip()]
    for name in names:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}' (valid: {', '.join(PRESETS)}; combine "
                              "them with a comma, e.g. reference,quick)")
    return names


def dumps_all(cfg: Config) -> str:
    """TOML of the whole resolved config: every section (each strategy's too), every key."""
    return _toml(to_dict(cfg))


def milestones(text: str, key: str = "fl.lr_milestones") -> list[float]:
    """`0.25,0.5,0.75` as fractions of the rounds, each in [0, 1] (ConfigError naming
    `key` otherwise)."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            m = float(part)
        except ValueError:
            m = math.nan
        if not 0 <= m <= 1:
            raise ConfigError(f"{key} takes fractions of the rounds in [0, 1], comma-separated "
                              f"(e.g. 0.25,0.5,0.75), got {part!r}")
        out.append(m)
    return out


def validate(cfg: Config) -> None:
    """Reject what cannot run, one line each. Budget feasibility needs the data: see loop."""
    from falkit import registry  # lazily: torch, the registries

    registry.algorithm(cfg.fl.algorithm)  # a built-in, a plug-in or module:Class
    strategy_cls = registry.strategy_class(cfg.strategy)
    flat = flatten(to_dict(cfg))
    for key, valid in choices().items():
        if key == "fl.algorithm":
            continue  # checked above (a spec is valid too)
        if flat[key] not in valid:
            raise ConfigError(f"{key} = {flat[key]!r} is not one of {', '.join(valid)}")
    for name in tracker_names(cfg):
        if name not in TRACKERS:
            raise ConfigError(f"tracking: {name!r} is not one of {', '.join(TRACKERS)}")
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # torch trains in float32
            raise ConfigError(f"{key} must be at most {FLOAT32_MAX:.4g} in size (float32), "
                              f"got {value:g}")
    for key, lo, hi, lo_in, hi_in in ranges():
        v = flat[key]
        if v is None:
            continue
        ok = ((lo is None or (v >= lo if lo_in else v > lo))
              and (hi is None or (v <= hi if hi_in else v < hi)))
        if not ok:
            hint = ("; the reference code's 0.05 is rho = 20" if key == "data.rho" else "")
            raise ConfigError(f"{key} must be {_range_text(lo, hi, lo_in, hi_in)}, got "
                              f"{v:g}{hint}")
    milestones(cfg.fl.lr_milestones, "fl.lr_milestones")
    if cfg.name:
        check_name(cfg.name)
    if not cfg.out_dir.strip():
        raise ConfigError("out_dir cannot be empty (the default is runs)")
    for section in cfg.sections().values():  # what a method's own options rule out
        if isinstance(section, options_mod.Options):
            section.check(cfg)
    if cfg.partition.method == "json" and not cfg.partition.file:
        raise ConfigError("partition.method = json needs partition.file = PATH")
    if cfg.partition.shift != "none" and cfg.partition.method == "sites":
        raise ConfigError("partition.shift simulates domain shift on a partitioned dataset; "
                          "with partition.method = sites each site's data has its own")
    if cfg.model.backbone.startswith("frozen:"):  # models.backbones.FROZEN
        from falkit.models.encoders import check_spec

        check_spec(cfg.model.backbone[len("frozen:"):])
        if cfg.partition.method == "sites" and cfg.model.backbone.startswith("frozen:pca"):
            raise ConfigError("model.backbone = frozen:pca fits its basis on each site's own "
                              "data: with partition.method = sites the sites' embeddings "
                              "would not share coordinates; use a pretrained encoder")
    strategy_cls.check_config(cfg)  # what the run's strategy rules out
    # the names `falkit run` resolves before it reads any data, with its own functions, so
    # that every command that loads a config (falkit config too) refuses what a run refuses
    from falkit.al.base import create as create_strategy  # lazily: torch, the registries
    from falkit.data.sources import check_val_split

    create_strategy(cfg.strategy, **strategy_options(cfg))  # name, @G/@L, its options
    check_val_split(cfg.data.dataset, cfg.data.val_split)  # the dataset's name too
    check_device(cfg.runtime.device)


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and only a CUDA device this machine has."""
    if device == "cpu":
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise ConfigError(f"runtime.device must be cpu, cuda or cuda:N, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"runtime.device = {device}, but this machine (or this torch "
                          f"{torch.__version__} build) has no CUDA GPU; use runtime.device=cpu")
    n = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= n:
        raise ConfigError(f"runtime.device = {device}, but this machine has {n} CUDA "
                          f"device(s) (cuda:0..cuda:{n - 1})")


def _toml_value(v: Any) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dumps(cfg: Config) -> str:
    """TOML text of the resolved config (the run's own strategy section only); TOML has no
    null, so None is written as "none"."""
    return _toml(experiment_dict(cfg))


def _toml(d: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for section, values in d.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def loads(text: str) -> Config:
    flat = flatten(tomllib.loads(text))
    _register_named(flat)
    cfg = Config()
    apply(cfg, flat)
    return cfg


def _register_named(*layers: dict[str, Any]) -> None:
    """Import the `module:Class` methods these settings name (the last layer wins), so that
    their options sections exist before the settings are applied."""
    from falkit import registry

    for key, kind in (("strategy", "strategy"), ("fl.algorithm", "fl_algorithm")):
        value = next((lay[key] for lay in reversed(layers) if key in lay), None)
        if isinstance(value, str) and registry.is_spec(value.partition("@")[0]):
            registry.resolve(kind, value.partition("@")[0])
