"""An on-disk cache of the frozen vision tower's output features (`feature_cache` in the run config).

The tower is frozen and in eval mode, and the images have no random augmentation, so an image
gives the same tower features every epoch: they are stored on first use and read back afterwards,
and the tower runs only on the images the cache lacks (the trainable projector always runs).

Keys (no entry is ever returned for another tower, preprocessing or file):
- the folder: a fingerprint of the tower: its config (select layer and feature, `pool_to`, square
  padding), its class, every state_dict tensor's name, dtype, shape and bytes, and the numerics
  around it (torch version, device kind), hashed once per run before ZeRO-3 shards the weights;
- the entry: the sha256 of the preprocessed pixel tensor (its dtype, shape and bytes). That tensor
  is exactly what the tower reads: a function of the image file's bytes and of every
  preprocessing setting (processor size, crop, mean and std, square padding, EXIF orientation),
  so a changed file or another processor gives another key, and no processor setting can be
  left out of a fingerprint by mistake.

Layout: ROOT/<tower fingerprint>/tower.json (what the tower is, for people) and
ROOT/<tower fingerprint>/<ab>/<pixel sha256>.safetensors, one (tokens, hidden) tensor each, with
the full fingerprint in its metadata. ROOT is `files.cache_root("vision_features")` (it follows
MM_TEAMLORA_CACHE) or the folder the run config names. Entries are written with
`files.atomic_write` (a temporary file renamed into place), so any number of ranks may write the
same entry at once: a reader sees a whole entry or none. An entry that cannot be read is a miss
(and is rewritten); a failed write is a warning, never a failed run.

Under ZeRO-3 the tower's weights are sharded and gathered by collectives around its forward, so a
micro-batch whose images all hit still runs the tower once, on the blank image
(`MultimodalLM.vision_on_every_batch`): every rank makes the same collectives on every micro-step,
cache or not. Elsewhere a full hit skips the tower.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic_write, atomic_write_text, cache_root

logger = logging.getLogger(__name__)
FORMAT = "mm_teamlora.vision_features/1"
TENSOR = "features"


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def pixel_digest(pixels: torch.Tensor) -> str:
    """sha256 of one preprocessed image (C, H, W): dtype, shape and bytes."""
    h = hashlib.sha256(f"{pixels.dtype}|{tuple(pixels.shape)}|".encode())
    h.update(_tensor_bytes(pixels))
    return h.hexdigest()


def tower_fingerprint(tower: torch.nn.Module, device: torch.device | str = "cpu") -> str:
    """sha256 of what decides the tower's output for given pixels (see the module doc). Call it
    before DeepSpeed shards the weights (ZeRO-3 leaves empty tensors in the module)."""
    device = torch.device(device)
    config = dataclasses.asdict(tower.config) if dataclasses.is_dataclass(getattr(tower, "config", None)) else {}
    config.pop("path", None)  # where the weights were read from is not what they are: the bytes count
    numerics = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        numerics["gpu"] = torch.cuda.get_device_name(device)
    head = {"format": FORMAT, "class": f"{type(tower).__module__}.{type(tower).__qualname__}",
            "encoder": type(getattr(tower, "encoder", tower)).__qualname__, "config": config, "numerics": numerics}
    if any(hasattr(p, "ds_id") for p in tower.parameters()):
        raise ValueError("the tower's weights are ZeRO-3 shards: fingerprint it before deepspeed.initialize")
    h = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def preprocessing_is_deterministic(preprocess) -> bool:
    """Whether `preprocess` gives the same tensor twice for the same (non-square, textured) image:
    a random augmentation almost surely does not."""
    gen = torch.Generator().manual_seed(0)
    array = (torch.rand(37, 53, 3, generator=gen) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(array)
    a, b = preprocess(image.copy()), preprocess(image.copy())
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


@dataclasses.dataclass
class Lookup:
    """One batch's images: their keys, and the cached features (None where missed)."""

    keys: list[str]
    features: list[torch.Tensor | None]

    @property
    def missing(self) -> list[int]:
        return [i for i, f in enumerate(self.features) if f is None]


class FeatureCache:
    """Tower features by pixel digest under one tower's folder; counts hits and misses."""

    def __init__(self, root: str, tower, device: torch.device | str = "cpu", fingerprint: str | None = None):
        self.fingerprint = fingerprint or tower_fingerprint(tower, device)
        self.folder = os.path.join(root, self.fingerprint[:32])
        self.tokens, self.hidden = tower.num_tokens, tower.hidden_size
        self.hits = self.misses = self.write_errors = self.read_errors = 0
        os.makedirs(self.folder, exist_ok=True)
        description = os.path.join(self.folder, "tower.json")
        if not os.path.isfile(description):
            config = dataclasses.asdict(tower.config) if dataclasses.is_dataclass(tower.config) else {}
            atomic_write_text(description, json.dumps({"format": FORMAT, "fingerprint": self.fingerprint,
                                                       "tower": config, "tokens": self.tokens,
                                                       "hidden_size": self.hidden},
                                                      indent=1) + "\n")

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], f"{key}.safetensors")

    def _read(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") != self.fingerprint:
                    raise ValueError("written for another tower")
                features = f.get_tensor(TENSOR)
        except FileNotFoundError:
            return None
        except Exception as e:  # a foreign or damaged file: a miss, rewritten on store
            self.read_errors += 1
            if self.read_errors == 1:
                logger.warning("vision feature cache: cannot read %s (%s: %s); recomputing it", path,
                               type(e).__name__, e)
            return None
        if tuple(features.shape) != (self.tokens, self.hidden):
            self.read_errors += 1
            return None
        return features

    def lookup(self, pixel_values: torch.Tensor) -> Lookup:
        """The cached features of each image of (N, C, H, W) `pixel_values` (None where missed)."""
        keys = [pixel_digest(p) for p in pixel_values]
        features = [self._read(k) for k in keys]
        found = sum(f is not None for f in features)
        self.hits += found
        self.misses += len(keys) - found
        return Lookup(keys, features)

    def store(self, lookup: Lookup, computed: torch.Tensor | None) -> None:
        """Write the features the tower `computed` for `lookup`'s misses (in order)."""
        missing = lookup.missing
        if not missing:
            return
        if computed is None or computed.shape[0] != len(missing):
            raise ValueError(f"{len(missing)} images missed the cache but the tower computed "
                             f"{0 if computed is None else computed.shape[0]}")
        computed = computed.detach().to("cpu")
        written = set()
        for row, i in enumerate(missing):
            key = lookup.keys[i]
            if key in written:  # the same image twice in one batch
                continue
            written.add(key)
            tensor = {TENSOR: computed[row].clone().contiguous()}
            meta = {"format": FORMAT, "fingerprint": self.fingerprint}
            path = self.path(key)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_write(path, lambda tmp: save_file(tensor, tmp, metadata=meta))
            except OSError as e:
                self.write_errors += 1
                if self.write_errors == 1:
                    logger.warning("vision feature cache: cannot write %s (%s); training goes on without it",
                                   path, e)


def cache_folder(setting: bool | str) -> str | None:
    """The cache root a run's `feature_cache` names: None (off), the package cache, or a folder."""
    if setting is False:
        return None
    if setting is True:
        return cache_root("vision_features")
    return os.path.abspath(os.path.expanduser(setting))


def from_run(setting: bool | str, model, image_processor, has_images: bool, device, log: bool = True
             ) -> FeatureCache | None:
    """The run's cache, or None with the reason logged: off in the run config, no image in the
    data, a tower that trains, or a preprocessing that is not deterministic (augmentation)."""
    root = cache_folder(setting)

    def off(reason: str, warn: bool = False) -> None:
        if log:
            (logger.warning if warn else logger.info)("vision feature cache: off (%s)", reason)
        return None

    if root is None:
        return off("feature_cache: false")
    tower = model.vision_tower
    if any(p.requires_grad for p in tower.parameters()):
        return off("the vision tower trains, so its features change", warn=True)
    if not has_images:
        return off("the training data has no image")
    if image_processor is None or not preprocessing_is_deterministic(image_processor):
        return off("the image preprocessing is not deterministic (random augmentation?)", warn=True)
    cache = FeatureCache(root, tower, device)
    if log:
        logger.info("vision feature cache: on, %s (tower fingerprint %s); the tower runs only on images "
                    "it has not stored", cache.folder, cache.fingerprint[:12])
    return cache
