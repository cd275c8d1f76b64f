"""Demo data from real installed assets (easy-VQA shapes, scikit-learn digits, scikit-image photos,
WordNet): a LLaVA-format training mix and a disjoint MMBench-format evaluation set. See `build`."""

from .assets import PHOTO_CAPTIONS, DemoAssets, Photo, ShapeImage, load_assets
from .build import DATA_VERSION, DEFAULT_OUT, L2_CATEGORIES, build_demo_data, format_summary, mixture_yaml
from .disjoint import (DisjointnessError, check_disjoint, check_letters_balanced, letter_counts, pixel_hash,
                       read_mmbench_tsv)
from .splits import MC_CATEGORIES, SOURCES
from .wordnet import AssetMissingError, Noun, find_wordnet_dir, load_nouns

__all__ = ["DATA_VERSION", "PHOTO_CAPTIONS", "DemoAssets", "Photo", "ShapeImage", "load_assets", "DEFAULT_OUT", "L2_CATEGORIES",
           "MC_CATEGORIES", "SOURCES", "build_demo_data", "format_summary", "mixture_yaml", "DisjointnessError",
           "check_disjoint", "check_letters_balanced", "letter_counts", "pixel_hash", "read_mmbench_tsv",
           "AssetMissingError", "Noun", "find_wordnet_dir", "load_nouns"]

