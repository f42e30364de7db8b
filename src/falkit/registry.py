"""Where falkit finds its methods (issue 26): the built-ins, installed plug-ins and
`module:Class` specs, for every place a method's name is accepted.

* **built-ins**: the strategies of `falkit.al`, the FL algorithms of `falkit.fl`, the
  backbones of `falkit.models.backbones`;
* **plug-ins**: an installed package's entry points in the groups of `GROUPS`
  (`falkit.strategies`, `falkit.fl_algorithms`, `falkit.backbones`, `falkit.datasets`),
  each `name = "module:attr"`; they are read once, on first use;
* **specs**: `"mylab.bald:Bald"` wherever a name is accepted (`strategy`, `fl.algorithm`,
  `model.backbone`, `data.dataset`), imported on first use — on a Flower site too, so each
  site imports it from its own environment.

A strategy or FL algorithm registers under its class's `name`; its options section (its
`options` dataclass, `falkit.options`) is then a section of every `Config`. A plug-in that
cannot be imported, or is not what its group holds, is a one-line `ConfigError` (exit 2)
when it is named or listed, never a traceback, and it does not break the other methods.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from falkit.errors import ConfigError

GROUPS = {"strategy": "falkit.strategies", "fl_algorithm": "falkit.fl_algorithms",
          "backbone": "falkit.backbones", "dataset": "falkit.datasets"}

# (kind, name) -> where it comes from: "falkit", "plug-in <dist> (<module:attr>)" or the spec
ORIGINS: dict[tuple[str, str], str] = {}
# (kind, name) -> why a plug-in's entry point could not be used
BROKEN: dict[tuple[str, str], str] = {}
# (kind, spec) -> the registered name a `module:attr` spec resolved to
_SPECS: dict[tuple[str, str], str] = {}
# plug-in datasets: name -> a callable (data_root) -> falkit.data.sources.ImageDataset
DATASETS: dict[str, Any] = {}
_state = {"builtins": False, "plugins": False}


def _tables() -> dict[str, dict[str, Any]]:
    from falkit.al.base import STRATEGIES
    from falkit.fl.algorithms import ALGORITHMS
    from falkit.models.backbones import BACKBONES

    return {"strategy": STRATEGIES, "fl_algorithm": ALGORITHMS, "backbone": BACKBONES,
            "dataset": DATASETS}


def load() -> None:
    """Register the built-ins, then every installed plug-in (once per process)."""
    if not _state["builtins"]:
        _state["builtins"] = True
        import falkit.al.strategies  # noqa: F401  (each built-in strategy registers itself)

        for kind, table in _tables().items():
            for name, obj in table.items():
                module = getattr(obj[0] if kind == "backbone" else obj, "__module__", "")
                if module.startswith("falkit."):
                    ORIGINS.setdefault((kind, name), "falkit")
    if not _state["plugins"]:
        _state["plugins"] = True
        for kind, group in GROUPS.items():
            for ep in importlib.metadata.entry_points(group=group):
                dist = ep.dist.name if ep.dist is not None else "?"
                where = f"plug-in {dist} ({ep.value})"
                try:
                    _add(kind, ep.name, ep.load(), where)
                except ConfigError as e:
                    BROKEN[(kind, ep.name)] = str(e)
                except Exception as e:  # noqa: BLE001 (a plug-in's own failure, reported)
                    BROKEN[(kind, ep.name)] = (f"{kind.replace('_', ' ')} plug-in "
                                               f"{ep.name!r} from {dist} ({ep.value}) "
                                               f"cannot be imported: "
                                               f"{type(e).__name__}: {e}")


def _check(kind: str, obj: Any, what: str) -> None:
    """Refuse an object that is not what `kind` holds (one line, naming `what`)."""
    from falkit.al.base import Strategy
    from falkit.fl.algorithms import FedAvg
    from falkit.models.backbones import Backbone

    want = {"strategy": Strategy, "fl_algorithm": FedAvg, "backbone": Backbone}.get(kind)
    if want is not None and not (isinstance(obj, type) and issubclass(obj, want)):
        raise ConfigError(f"{what} is not a {want.__module__}.{want.__name__} subclass "
                          f"(got {obj!r})")
    if want is None and not callable(obj):
        raise ConfigError(f"{what} is not callable (a dataset plug-in is a function "
                          "data_root -> ImageDataset)")
    if kind in ("strategy", "fl_algorithm") and (not obj.name or (
            obj is not want and obj.name == want.name)):
        raise ConfigError(f"{what} has no `name` of its own")


def _add(kind: str, name: str, obj: Any, where: str) -> str:
    """Register `obj` as a `kind` under `name` (strategies and FL algorithms: their class's
    `name`); the name it is registered under."""
    _check(kind, obj, where)
    table = _tables()[kind]
    if kind in ("strategy", "fl_algorithm"):
        name = obj.name
        _check_options(obj, where)
    current = table.get(name)
    if kind == "backbone" and current is not None:
        current = current[0]
    if current is not None and current is not obj:
        raise ConfigError(f"{where} would replace the {kind.replace('_', ' ')} {name!r} of "
                          f"{ORIGINS.get((kind, name), 'falkit')}: give it another name")
    if current is None:
        if kind == "backbone":
            doc = (obj.__doc__ or "").strip().splitlines()
            table[name] = (obj, doc[0] if doc else "")
        else:
            table[name] = obj
    ORIGINS.setdefault((kind, name), where)
    return name


def _check_options(cls: Any, where: str) -> None:
    """A method's options section must be a dataclass and must not take a name the config
    already uses (a core section or another method's)."""
    import dataclasses

    opts = cls.options
    if opts is None:
        return
    if not (isinstance(opts, type) and dataclasses.is_dataclass(opts)):
        raise ConfigError(f"{where}: `options` must be a dataclass, got {opts!r}")
    from falkit.config import CORE_SECTIONS, Config

    if cls.name in CORE_SECTIONS or hasattr(Config, cls.name):
        raise ConfigError(f"{where}: the name {cls.name!r} is a config section or attribute "
                          "of falkit's own; give the method another name")
    tables = _tables()
    for other in ("strategy", "fl_algorithm"):  # one options section per name
        clash = tables[other].get(cls.name)
        if clash is not None and clash is not cls and clash.options is not None:
            raise ConfigError(f"{where}: the options section [{cls.name}] is already the "
                              f"{other.replace('_', ' ')} {cls.name!r}'s; give the method "
                              "another name")


def is_spec(name: str) -> bool:
    return ":" in name and not name.startswith(("npz:", "imagefolder:", "csv:", "hf:",
                                                  "frozen:"))


def resolve(kind: str, name: str) -> str:
    """The registered name of `name` (a name, or a `module:attr` spec, imported now)."""
    load()
    if (kind, name) in BROKEN and name not in _tables()[kind]:  # a built-in stays usable
        raise ConfigError(BROKEN[(kind, name)])
    if not is_spec(name):
        return name
    if (kind, name) in _SPECS:
        return _SPECS[(kind, name)]
    module, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as e:
        raise ConfigError(f"{kind.replace('_', ' ')} {name!r}: cannot import {module!r} "
                          f"({type(e).__name__}: {e})") from None
    except AttributeError:
        raise ConfigError(f"{kind.replace('_', ' ')} {name!r}: {module!r} has no "
                          f"{attr!r}") from None
    except Exception as e:  # noqa: BLE001 (the module's own failure, reported in one line)
        raise ConfigError(f"{kind.replace('_', ' ')} {name!r}: importing {module!r} failed "
                          f"({type(e).__name__}: {e})") from None
    # backbones and datasets are looked up by the spec itself
    registered = _add(kind, name, obj, name)
    _SPECS[(kind, name)] = registered
    return registered


def strategy_class(strategy_id: str) -> type:
    """The Strategy class of a strategy id ("entropy@G", "mylab.bald:Bald")."""
    from falkit.al.base import STRATEGIES, list_ids

    name = resolve("strategy", strategy_id.partition("@")[0])
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{strategy_id}' (valid: {', '.join(list_ids())}"
                          ", or a plug-in: module:Class)")
    return STRATEGIES[name]


def algorithm(name: str) -> type:
    """The FedAvg subclass registered as `fl.algorithm = name` (or a `module:Class` spec)."""
    from falkit.fl.algorithms import ALGORITHMS

    key = resolve("fl_algorithm", name)
    if key not in ALGORITHMS:
        raise ConfigError(f"unknown fl.algorithm '{name}' (valid: {', '.join(ALGORITHMS)}, "
                          "or a plug-in: module:Class)")
    return ALGORITHMS[key]


def dataset(name: str) -> Any:
    """A plug-in's dataset function (data_root) -> ImageDataset for `name` (an entry point's
    name or a `module:function` spec), or None if `name` is neither."""
    load()
    if (("dataset", name) in BROKEN) or is_spec(name):
        resolve("dataset", name)
    return DATASETS.get(name)


def name_of(cls: type) -> str:
    """The name a method's class is registered under, else its `module:Class` spec."""
    load()
    for table in _tables().values():
        for name, obj in table.items():
            if obj is cls or (isinstance(obj, tuple) and obj[0] is cls):
                return name
    return f"{cls.__module__}:{cls.__qualname__}"


def option_sections(kind: str | None = None) -> dict[str, type]:
    """Method name -> its options dataclass, for every registered strategy and FL algorithm
    (or only those of `kind`) that has one: the method sections of a Config, in
    registration order."""
    load()
    tables = _tables()
    out: dict[str, type] = {}
    for k in ((kind,) if kind else ("strategy", "fl_algorithm")):
        for name, cls in tables[k].items():
            if cls.options is not None:
                out[name] = cls.options
    return out


def method_names(kind: str) -> tuple[str, ...]:
    """The registered names of `kind` (built-ins first, then plug-ins), working ones only."""
    load()
    return tuple(_tables()[kind])


def listing() -> list[tuple[str, str, str]]:
    """(kind, name, origin) of every plug-in, broken ones with their error: `falkit list`."""
    load()
    out = [(kind, name, where) for (kind, name), where in ORIGINS.items()
           if where != "falkit"]
    out += [(kind, name, f"BROKEN: {why}") for (kind, name), why in BROKEN.items()]
    return out
