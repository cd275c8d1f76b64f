"""Mixture configs (`data_configs/*.yaml`): dataclasses that check themselves and round-trip.

A mixture names its sources and how much of each to draw:
- `repeat` (default 1 for every source): a source contributes `round(repeat * kept)` records, its
  whole records `floor(repeat)` times plus a seeded random part for the fraction (0.5 = half).
- `weight` (then on every source): weights are proportions of the mixture; the total is
  `num_samples`, or by default the most records possible without repeating any source (as
  `datasets.interleave_datasets` stops at the first exhausted source).
`max_samples` reads only the first records of a source's file (before checks and sampling).
`dataset: KEY` reads a LLaMA-Factory dataset: `path` is its `dataset_info.json` (`data.llamafactory`).

Relative paths (`path`, `image_root`, `cache_dir`, a `tokenizer` folder) resolve against the YAML
file's folder. Unknown keys, wrong types and non-positive weights or repeats are `ConfigError`s.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

import yaml

from ..files import read_yaml
from .errors import ConfigError
from .images import ImageCheckConfig
from .sources import FORMATS
from .templates import TEMPLATES

ON_ERROR = ("raise", "skip")
TRUNCATION = ("tail", "skip")


def _strict(cls, data: object, where: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(sorted(known))}")
    return dict(data)


def _check(where: str, name: str, value: object, kinds: tuple, positive: bool = False, choices=None) -> None:
    if value is None and type(None) in kinds:
        return
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = "/".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ConfigError(f"{where}: {name} must be {names}, got {value!r}")
    if positive and not value > 0:
        raise ConfigError(f"{where}: {name} must be positive, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {name} must be one of {', '.join(choices)}, got {value!r}")


def _resolve(base_dir: str | None, path: str | None) -> str | None:
    if path is None or base_dir is None:
        return path
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


@dataclass
class SourceConfig:
    """One instruction file and how much of it to use."""

    path: str
    format: str = "auto"  # auto | llava | alpaca | messages
    image_root: str | None = None
    name: str | None = None  # defaults to the file name without extension
    weight: float | None = None
    repeat: float | None = None
    max_samples: int | None = None
    # a key of the LLaMA-Factory dataset_info.json that `path` names (data.llamafactory)
    dataset: str | None = None

    def validate(self, where: str = "source") -> "SourceConfig":
        _check(where, "path", self.path, (str,))
        _check(where, "format", self.format, (str,), choices=FORMATS)
        _check(where, "image_root", self.image_root, (str, type(None)))
        _check(where, "name", self.name, (str, type(None)))
        _check(where, "weight", self.weight, (int, float, type(None)), positive=True)
        _check(where, "repeat", self.repeat, (int, float, type(None)), positive=True)
        _check(where, "max_samples", self.max_samples, (int, type(None)), positive=True)
        _check(where, "dataset", self.dataset, (str, type(None)))
        if self.dataset is not None and self.format != "auto":
            raise ConfigError(f"{where}: a LLaMA-Factory dataset's entry gives its format; drop format "
                              f"{self.format!r} or dataset {self.dataset!r}")
        if self.weight is not None and self.repeat is not None:
            raise ConfigError(f"{where}: give weight or repeat, not both")
        if self.name is None:
            self.name = self.dataset or os.path.splitext(os.path.basename(self.path))[0]
        return self


@dataclass
class MixtureConfig:
    """A mixture of sources plus everything that decides how they are tokenised and checked."""

    sources: list[SourceConfig]
    name: str = "mixture"
    template: str = "chat"  # chat | vicuna_v1 | plain
    # `data check` without --model only: "tiny" (the test tokenizer) or a tokenizer folder; training
    # and `data check --model` use the model's tokenizer
    tokenizer: str | None = None
    max_length: int = 2048  # counting image_token_count tokens per image
    # tokens per image; the model's value is the truth: optional here (for `data check` without a
    # model), and a value that disagrees with the model is an error (`build_dataset`)
    image_token_count: int | None = None
    seed: int = 0
    on_error: str = "raise"  # raise | skip
    truncation: str = "tail"  # tail | skip
    num_samples: int | None = None  # total size with weights (default: no source repeated)
    shuffle: bool = True
    system_prompt: str | None = None  # added to conversations that have no system turn
    cache_dir: str | None = None  # default files.cache_root("data")
    images: ImageCheckConfig = field(default_factory=ImageCheckConfig)

    def validate(self) -> "MixtureConfig":
        where = f"mixture {self.name!r}"
        _check(where, "name", self.name, (str,))
        _check(where, "template", self.template, (str,), choices=TEMPLATES)
        _check(where, "tokenizer", self.tokenizer, (str, type(None)))
        _check(where, "max_length", self.max_length, (int,), positive=True)
        _check(where, "image_token_count", self.image_token_count, (int, type(None)), positive=True)
        _check(where, "seed", self.seed, (int,))
        _check(where, "on_error", self.on_error, (str,), choices=ON_ERROR)
        _check(where, "truncation", self.truncation, (str,), choices=TRUNCATION)
        _check(where, "num_samples", self.num_samples, (int, type(None)), positive=True)
        _check(where, "shuffle", self.shuffle, (bool,))
        _check(where, "system_prompt", self.system_prompt, (str, type(None)))
        _check(where, "cache_dir", self.cache_dir, (str, type(None)))
        if not isinstance(self.sources, list) or not self.sources:
            raise ConfigError(f"{where}: sources must be a non-empty list")
        for i, source in enumerate(self.sources):
            source.validate(f"{where}, source {i}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: source names must be unique, got {names}")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ConfigError(f"{where}: give a weight to every source or to none (then use repeat)")
        if self.num_samples is not None and not all(weighted):
            raise ConfigError(f"{where}: num_samples needs weights on the sources")
        self.images.validate()
        return self

    @property
    def weighted(self) -> bool:
        return self.sources[0].weight is not None

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | None = None) -> "MixtureConfig":
        """Build and check a config; relative paths resolve against `base_dir` when given."""
        data = _strict(cls, data, "mixture")
        if "sources" not in data:
            raise ConfigError("mixture: no sources")
        if not isinstance(data["sources"], list):
            raise ConfigError("mixture: sources must be a list")
        sources = []
        for i, raw in enumerate(data.pop("sources")):
            source = _strict(SourceConfig, raw, f"mixture, source {i}")
            if "path" not in source:
                raise ConfigError(f"mixture, source {i}: no path")
            if isinstance(source["path"], str):
                source["path"] = _resolve(base_dir, source["path"])
            if isinstance(source.get("image_root"), str):
                source["image_root"] = _resolve(base_dir, source["image_root"])
            sources.append(SourceConfig(**source))
        images = ImageCheckConfig(**_strict(ImageCheckConfig, data.pop("images", None) or {}, "mixture, images"))
        if isinstance(data.get("cache_dir"), str):
            data["cache_dir"] = _resolve(base_dir, data["cache_dir"])
        tokenizer = data.get("tokenizer")
        if isinstance(tokenizer, str) and tokenizer != "tiny" and base_dir is not None:
            local = _resolve(base_dir, tokenizer)
            # a path when it looks like one or exists; otherwise a hub id (local cache only)
            if tokenizer.startswith((".", "~", os.sep)) or os.path.isdir(local):
                data["tokenizer"] = local
        return cls(sources=sources, images=images, **data).validate()

    @classmethod
    def from_yaml(cls, path: str) -> "MixtureConfig":
        data = read_yaml(path, "the mixture", ConfigError)
        try:
            return cls.from_dict(data, base_dir=os.path.dirname(os.path.abspath(path)))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, allow_unicode=True)
