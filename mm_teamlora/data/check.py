"""`mm-teamlora data check CONFIG.yaml`: the whole data pipeline, no training.

Reads, checks, tokenises (or loads from the cache) and samples every source, loads and processes
the images of a first batch and collates it, then prints the counts by source and reason. Under
`on_error: raise` the first bad record ends the check with exit code 1 (so does an empty
mixture); an unusable config or tokenizer gives 2. The report goes to `<out>/data_report.json` when `out` is given.
"""

from __future__ import annotations

import os

from .collate import DataCollator
from .config import MixtureConfig
from .dataset import InstructionDataset
from .errors import ConfigError, DataError
from .images import ResizeToTensor
from .mixture import build_mixture, write_report

CHECK_BATCH = 4


def load_tokenizer(spec: str):
    """`tiny` (the offline test tokenizer), a tokenizer folder, or a hub id already in the local
    cache (nothing is downloaded)."""
    if spec == "tiny":
        from ..tiny_tokenizer import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load tokenizer {spec!r} from a folder or the local cache: {e}") from None


def check_mixture(config_path: str, out: str | None = None, tokenizer: str | object | None = None,
                  image_token_count: int | None = None, rebuild: bool = False, full_decode: bool = False,
                  cache_dir: str | None = None) -> int:
    """Run the data pipeline of a mixture YAML and print its counts; returns the exit code.

    `tokenizer`: a tokenizer object, or a spec for `load_tokenizer`; default the YAML's
    `tokenizer`. `image_token_count`: the model's tokens per image (default the YAML's, 576).
    `rebuild`: ignore the cache. `full_decode`: decode every image, not only headers."""
    try:
        config = MixtureConfig.from_yaml(config_path)
        if image_token_count is not None:
            config.image_token_count = image_token_count
        if full_decode:
            config.images.full_decode = True
        config.validate()
        spec = tokenizer if tokenizer is not None else config.tokenizer
        if spec is None:
            raise ConfigError(f"{config_path}: no tokenizer; name one in the YAML (tokenizer: tiny | FOLDER) "
                              "or pass one")
        tok = load_tokenizer(spec) if isinstance(spec, str) else spec
        mixture = build_mixture(config, tok, cache_dir=cache_dir, rebuild=rebuild, report_dir=out)
        dataset = InstructionDataset(mixture, ResizeToTensor())
        if len(dataset):
            batch = DataCollator.from_tokenizer(tok)([dataset[i] for i in range(min(CHECK_BATCH, len(dataset)))])
            images = 0 if batch["pixel_values"] is None else len(batch["pixel_values"])
            print(f"first batch: input_ids {tuple(batch['input_ids'].shape)}, {images} images; "
                  f"{len(dataset)} samples in the mixture")
        else:
            print("data check failed: the mixture is empty")
            return 1
    except DataError as e:
        print(f"data check failed (on_error: raise): {e}")
        if out is not None:
            write_report({"config": os.path.abspath(config_path), "error": e.to_dict()}, out)
        return 1
    except ConfigError as e:
        print(f"data check: {e}")
        return 2
    return 0
