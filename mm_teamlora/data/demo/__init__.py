"""Demo data from real installed assets (easy-VQA shapes, scikit-learn digits, scikit-image photos,
WordNet): a LLaVA-format training mix and a disjoint MMBench-format evaluation set. See `build`."""

from .assets import PHOTO_CAPTIONS, DemoAssets, Photo, ShapeImage, load_assets
from .build import (DEFAULT_OUT, L2_CATEGORIES, MC_CATEGORIES, SOURCES, build_demo_data, format_summary,
                    mixture_yaml)
from .disjoint import (DisjointnessError, check_disjoint, check_letters_balanced, letter_counts, pixel_hash,
                       read_mmbench_tsv)
from .wordnet import AssetMissingError, Noun, find_wordnet_dir, load_nouns

__all__ = ["PHOTO_CAPTIONS", "DemoAssets", "Photo", "ShapeImage", "load_assets", "DEFAULT_OUT", "L2_CATEGORIES",
           "MC_CATEGORIES", "SOURCES", "build_demo_data", "format_summary", "mixture_yaml", "DisjointnessError",
           "check_disjoint", "check_letters_balanced", "letter_counts", "pixel_hash", "read_mmbench_tsv",
           "AssetMissingError", "Noun", "find_wordnet_dir", "load_nouns", "demo_data_command"]


def demo_data_command(out: str = DEFAULT_OUT, seed: int = 0, train_size: int | None = None,
                      eval_size: int | None = None, wordnet_dir: str | None = None,
                      eval_text_only: bool = True) -> int:
    """Build the demo data and print a summary. Exit code 0; 1 when the written evaluation set
    overlaps the training set; 2 when an asset is missing or the arguments or `out` are unusable."""
    import sys

    try:
        build_demo_data(out, seed=seed, train_size=train_size, eval_size=eval_size, wordnet_dir=wordnet_dir,
                        eval_text_only=eval_text_only, verbose=True)
    except DisjointnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (AssetMissingError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
