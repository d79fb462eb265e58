"""Random unicode lines (empty, whitespace, control characters, emoji, right-to-left text,
odd line separators) through preprocess (as a test set) and translate with a tiny model: never
a crash, every line kept, in order. ``MTKIT_FUZZ_EXAMPLES=500`` runs a longer search."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from helpers import Workspace, get_workspace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtkit.data.dataset import ParallelDataset, load_spm
from mtkit.data.preprocess import preprocess
from mtkit.decoding.translate import translate_file

SPECIAL = [
    "", " ", "\t", "  \t ", "\x00", "\x01\x02\x7f", "\x1b[31mred\x1b[0m", "😀👍🏽🇩🇪", "a man 🐕 on a bike",
    "مرحبا بالعالم", "שלום עולם", "\u202ea man\u202c", "\u200f\u200e", "\ufeff", "\ufeffa man", "e\u0301\u0301",
    "\u2028", "a\u2029b", "\x85", "\x0b\x0c", "\x1c\x1d\x1e", "a\rb", "a man\r", "\u3000", "Ａ　ｍａｎ",
    "x" * 300, "a " * 200, "\U0010fffd", "\ud7ff\ue000", "漢字かなカナ", "the dog\\n is", "|||", '{"json": 1}',
]
line = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=30),
    st.lists(st.sampled_from("a man woman dog is on the bike red small".split()), min_size=1, max_size=8).map(" ".join),
)

_translations: dict[str, str] = {}  # input line (as read back) -> output, across examples


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return get_workspace(tmp_path_factory)


def as_read(text: str, first: bool) -> str:
    """What mtkit reads back for a written line: trailing CRs go (CRLF), and a BOM at the start of
    the file is not text."""
    text = text.rstrip("\r")
    return text[1:] if first and text.startswith("\ufeff") else text


@settings(max_examples=int(os.environ.get("MTKIT_FUZZ_EXAMPLES", "25")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(line, min_size=1, max_size=12))
def test_random_unicode_lines_survive_preprocess_and_translate(workspace, lines):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for lang in ("en", "de"):
            (tmp / f"fuzz.{lang}").write_bytes("".join(x + "\n" for x in lines).encode("utf-8"))
        preprocess("en", "de", workspace.corpus / "train", tmp / "data", test_prefixes=[tmp / "fuzz"],
                   spm_models=[workspace.data / "spm.model"], workers=1)
        ds = ParallelDataset(tmp / "data", "fuzz")
        spm, _ = load_spm(tmp / "data")
        read = [as_read(x, i == 0) for i, x in enumerate(lines)]
        assert len(ds) == len(lines)
        for i, text in enumerate(read):  # each pair is its own line, in order
            assert ds[i][0].tolist() == spm.encode([text])[0] == ds[i][1].tolist()

        stats = translate_file([workspace.ckpt], tmp / "fuzz.en", tmp / "out", device="cpu", batch_size=5,
                               buffer_lines=4, decode_overrides={"beam": 2, "max_len_a": 0.0, "max_len_b": 3})
        out = (tmp / "out").read_bytes().decode("utf-8").split("\n")
        assert out[-1] == "" and len(out) - 1 == len(lines) == stats["lines"]
        for text, hyp in zip(read, out):
            if not text.strip() or not spm.encode([text])[0]:
                assert hyp == ""
            # the same line gives the same output wherever it stands, in any batch or buffer
            assert _translations.setdefault(text, hyp) == hyp


@pytest.mark.parametrize("text", ["a man", "\x00", "😀", "مرحبا"])
def test_known_lines_translate_consistently(workspace, tmp_path, text):
    """Anchors the cross-example check above: a line alone and inside a file agree."""
    (tmp_path / "one").write_text(text + "\n", encoding="utf-8")
    (tmp_path / "many").write_text("\n".join(["a dog", text, "", text, "the red bike"]) + "\n", encoding="utf-8")
    opts = {"device": "cpu", "decode_overrides": {"beam": 2, "max_len_a": 0.0, "max_len_b": 3}}
    translate_file([workspace.ckpt], tmp_path / "one", tmp_path / "one.out", **opts)
    translate_file([workspace.ckpt], tmp_path / "many", tmp_path / "many.out", batch_size=2, **opts)
    one = (tmp_path / "one.out").read_text(encoding="utf-8").split("\n")
    many = (tmp_path / "many.out").read_text(encoding="utf-8").split("\n")
    assert len(one) == 2 and len(many) == 6 and many[2] == ""
    assert many[1] == many[3] == one[0]
