"""The docs cover the public API."""

from __future__ import annotations

import os
import re

import asyncckpt

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def test_api_reference_mentions_every_public_name() -> None:
    text = open(os.path.join(DOCS, "api.md")).read()
    missing = [n for n in asyncckpt.__all__ if not re.search(rf"`{n}[`(]", text)]
    assert missing == []


def test_forbidden_load_calls_are_absent_from_the_package() -> None:
    pkg = os.path.dirname(asyncckpt.__file__)
    bad = re.compile(r"pickle\.loads?\(|weights_only\s*=\s*False|\beval\(|\bexec\(")
    hits = []
    for name in os.listdir(pkg):
        if name.endswith(".py"):
            for i, line in enumerate(open(os.path.join(pkg, name)), 1):
                if bad.search(line):
                    hits.append(f"{name}:{i}: {line.strip()}")
    assert hits == []
