"""manifest.py: the manifest's own checksum, written in one encoding pass and checked
from the bytes read, with the canonical re-encoding for any other layout."""

from __future__ import annotations

import json
import os
import zlib

import pytest
import torch

from asyncckpt import AsyncCheckpointer, layout
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.manifest import Manifest


@pytest.fixture(scope="module")
def manifest_bytes(tmp_path_factory) -> bytes:
    root = str(tmp_path_factory.mktemp("m") / "ckpt")
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(5, dtype=torch.int64), "lr": 0.125}
    with AsyncCheckpointer(root, state={"model": state}) as ck:
        ck.save_async(7).result()
    with open(os.path.join(root, layout.step_dirname(7), layout.MANIFEST), "rb") as f:
        return f.read()


def _two_pass(doc: dict) -> bytes:
    """How manifests were encoded before: the body's canonical JSON checksummed, then the
    whole document encoded again with the checksum added last."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    crc = zlib.crc32(json.dumps(body, indent=1, allow_nan=True).encode())
    return json.dumps({**body, "checksum": crc}, indent=1, allow_nan=True).encode()


def test_one_pass_encoding_is_byte_identical_to_the_two_pass_one(manifest_bytes) -> None:
    m = Manifest.from_json(manifest_bytes, "m")
    out = m.to_json()
    assert out == manifest_bytes
    assert out == _two_pass(json.loads(out))  # so every earlier reader checks it the same way
    assert Manifest.from_json(out, "again").to_json() == out


@pytest.mark.parametrize("layout_kw", [{"indent": 2}, {"separators": (",", ":")}, {"indent": "\t"}])
def test_a_manifest_laid_out_otherwise_still_checks_by_its_content(manifest_bytes, layout_kw) -> None:
    doc = json.loads(manifest_bytes)
    other = json.dumps(doc, **layout_kw).encode()
    assert other != manifest_bytes
    m = Manifest.from_json(other, "relaid")
    assert m.to_json() == manifest_bytes
    doc["step"] += 1  # the same layout with its content changed fails
    with pytest.raises(CorruptCheckpointError, match="checksum does not match"):
        Manifest.from_json(json.dumps(doc, **layout_kw).encode(), "edited")


def test_every_changed_digit_is_caught(manifest_bytes) -> None:
    """Each digit of the manifest, the checksum's own included, changed to another: none of
    the results is accepted unless it means the same (a float's 17th digit may not matter)."""
    original = json.loads(manifest_bytes)
    positions = [i for i, c in enumerate(manifest_bytes) if chr(c).isdigit()]
    assert len(positions) > 50
    caught = 0
    for i in positions:
        c = manifest_bytes[i]
        bad = manifest_bytes[:i] + bytes([ord("0") + (c - ord("0") + 1) % 10]) + manifest_bytes[i + 1 :]
        try:
            same = json.loads(bad) == original
        except ValueError:  # e.g. a leading zero: not JSON at all
            same = False
        if same:
            assert Manifest.from_json(bad, "same").to_json() == manifest_bytes
            continue
        with pytest.raises(CorruptCheckpointError):
            Manifest.from_json(bad, f"digit {i}")
        caught += 1
    assert caught >= len(positions) - 2


def test_the_checksum_field_must_be_there_and_an_int(manifest_bytes) -> None:
    doc = json.loads(manifest_bytes)
    crc = doc.pop("checksum")
    with pytest.raises(CorruptCheckpointError, match="no 'checksum' field"):
        Manifest.from_json(json.dumps(doc, indent=1).encode(), "none")
    for wrong in (str(crc), float(crc), True):
        text = json.dumps({**doc, "checksum": wrong}, indent=1).encode()
        with pytest.raises(CorruptCheckpointError, match="checksum does not match"):
            Manifest.from_json(text, "typed")


def test_a_body_edit_that_keeps_the_checksum_line_is_caught(manifest_bytes) -> None:
    """The fast path checks the bytes before the checksum line; an edit there that still
    parses (another float value, a changed key) must fail it and the re-encoding alike."""
    assert b'"v": 0.125' in manifest_bytes
    bad = manifest_bytes.replace(b'"v": 0.125', b'"v": 0.25 ')
    with pytest.raises(CorruptCheckpointError, match="checksum does not match"):
        Manifest.from_json(bad, "edited")
