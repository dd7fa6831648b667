"""Real English Wikipedia text (gensim's test dump, shared DATA.md), split by article into
calibration and evaluation sets that never overlap, tokenized into fixed windows."""

from __future__ import annotations

import bz2
import importlib.util
from pathlib import Path

import torch

from effc.errors import UnsupportedError

WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPLIT = "articles with an even index (in dump order) calibrate, odd ones evaluate"


def articles() -> list[tuple[str, str]]:
    """(title, plain text) of the dump's articles, redirects dropped, in dump order."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise UnsupportedError("the Wikipedia text needs gensim: pip install 'effc[data]'")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(spec.submodule_search_locations[0]) / WIKI
    out = []
    for title, text, _ in extract_pages(bz2.open(path), filter_namespaces=("0",)):
        if not text.lstrip().lower().startswith("#redirect"):
            out.append((title, filter_wiki(text)))
    return out


def split() -> tuple[str, str]:
    """(calibration text, evaluation text): disjoint articles (see SPLIT)."""
    arts = articles()
    calib = "\n\n".join(text for i, (_, text) in enumerate(arts) if i % 2 == 0)
    evaluation = "\n\n".join(text for i, (_, text) in enumerate(arts) if i % 2 == 1)
    return calib, evaluation


ORDERS = ("first", "shuffled")


def windows(
    tokenizer, text: str, count: int, length: int, order: str = "first", seed: int = 0
) -> torch.Tensor:
    """``count`` non-overlapping windows of ``length`` tokens: (count, length) int64.

    ``order="first"``: the text's first windows, so a small count covers one or two articles.
    ``order="shuffled"``: the text is cut into all its whole windows and ``count`` of them are
    taken in a seeded random order, so they spread over the articles; the first k windows of a
    larger count are the windows of count k (nested, like ``"first"``).
    """
    if order not in ORDERS:
        raise ValueError(f"window order {order!r}: expected one of {', '.join(ORDERS)}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < count * length:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than {count} x {length}")
    every = ids[: ids.numel() // length * length].view(-1, length)
    if order == "first":
        return every[:count].clone()
    pick = torch.randperm(every.shape[0], generator=torch.Generator().manual_seed(seed))
    return every[pick[:count]].clone()
