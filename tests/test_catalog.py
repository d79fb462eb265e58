"""The dataset catalog: its contents and the file resolution order (never touching the network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from mtkit.data import catalog as cat
from mtkit.data import download as dl
from mtkit.data.catalog import SplitSource, load_catalog, resolution_plan, resolve_file
from mtkit.errors import MtkitError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Each test gets its own cache and no MTKIT_DATA; any download from beyond 127.0.0.1 fails loudly."""
    monkeypatch.setenv("MTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTKIT_DATA", raising=False)
    monkeypatch.delenv("MTKIT_OFFLINE", raising=False)
    urlopen = dl.urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        if not str(url).startswith("http://127.0.0.1:"):
            raise AssertionError("tests must not touch the network")
        return urlopen(url, *args, **kwargs)

    monkeypatch.setattr(dl.urllib.request, "urlopen", local_only)


def _gz(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def _split(**kw) -> SplitSource:
    base = dict(dataset="toy", name="train", langs=("en", "de"), url="https://example.org/train.{lang}.gz")
    base.update(kw)
    return SplitSource(**base)


def test_shipped_catalog_is_valid_and_the_top_level_copy_matches():
    c = load_catalog()
    assert {"multi30k", "wmt14_en_de", "wmt14_en_fr", "wmt15_en_de", "wmt16_en_de", "iwslt14_de_en"} <= set(c.datasets)
    assert (ROOT / "data" / "catalog.yaml").read_bytes() == cat.CATALOG_PATH.read_bytes()
    wmt = c.datasets["wmt14_en_de"]
    assert {"europarl_v7", "commoncrawl", "news_commentary_v9", "newstest2013", "newstest2014"} <= set(wmt)
    assert wmt["newstest2014"].sacrebleu == {"test_set": "wmt14/full", "langpair": "en-de"}
    assert c.split("multi30k/test_2016_flickr").filename("de") == "test_2016_flickr.de.gz"


SHARED_MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"


def test_every_multi30k_file_has_a_checksum():
    for split in load_catalog().datasets["multi30k"].values():
        for lang in split.langs:
            assert len(split.checksum(lang) or "") == 64, (split.name, lang)


@pytest.mark.skipif(not SHARED_MULTI30K.is_dir(), reason="no local Multi30k copy")
def test_multi30k_checksums_match_the_pinned_files():
    for split in load_catalog().datasets["multi30k"].values():
        for lang in split.langs:
            path = SHARED_MULTI30K / split.filename(lang)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == split.checksum(lang), path


def test_sacrebleu_names_in_the_catalog_exist():
    from sacrebleu.dataset import DATASETS

    for splits in load_catalog().datasets.values():
        for s in splits.values():
            if s.sacrebleu:
                assert s.sacrebleu["test_set"] in DATASETS, s.ref
                assert s.sacrebleu["langpair"] in DATASETS[s.sacrebleu["test_set"]].langpairs, s.ref


def test_unknown_names_suggest_the_closest():
    c = load_catalog()
    with pytest.raises(MtkitError, match="did you mean 'multi30k'"):
        c.split("multi30kk/train")
    with pytest.raises(MtkitError, match="did you mean 'newstest2014'"):
        c.split("wmt14_en_de/newstest2041")
    with pytest.raises(MtkitError, match="<dataset>/<split>"):
        c.split("multi30k")


def test_invalid_catalog_entries_are_rejected(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("datasets:\n  x:\n    splits:\n      a: {langs: [en, de], url: u, sha256: abc}\n")
    with pytest.raises(MtkitError, match="sha256"):
        load_catalog(bad)
    bad.write_text("datasets:\n  x:\n    splits:\n      a: {langs: [en, de]}\n")
    with pytest.raises(MtkitError, match="exactly one source"):
        load_catalog(bad)


def test_data_dir_comes_first_then_env_then_cache(tmp_path, monkeypatch):
    split = _split()
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    cached = _gz(cat.cache_dir() / "toy" / "train.en.gz", ["cache"])
    assert resolve_file(split, "en") == cached  # only the cache has it
    in_env = _gz(d2 / "train.en.gz", ["env"])
    monkeypatch.setenv("MTKIT_DATA", str(d2))
    assert resolve_file(split, "en") == in_env  # MTKIT_DATA before the cache
    nested = _gz(d1 / "toy" / "train.en.gz", ["nested"])
    assert resolve_file(split, "en", data_dir=d1) == nested  # --data-dir before MTKIT_DATA; DIR/<dataset>/ too
    plain = d1 / "train.en"
    plain.write_text("plain\n")
    assert resolve_file(split, "en", data_dir=d1) == plain  # DIR/<file> (plain text too) before DIR/<dataset>/
    plan = resolution_plan([("multi30k/train", "de")], data_dir=tmp_path / "empty")
    assert plan[0]["from"] == "download" and "train.de.gz" in plan[0]["path"]


def test_download_verifies_the_checksum(tmp_path, monkeypatch):
    payload = gzip.compress(b"hello\nworld\n")
    good = hashlib.sha256(payload).hexdigest()

    def fake_download(url, dest, sha256=None, timeout=60.0):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(payload)
        dl.verify(dest, sha256, url)
        return dest

    monkeypatch.setattr(cat, "download", fake_download)
    path = resolve_file(_split(sha256={"en": good}), "en")
    assert path == cat.cache_dir() / "toy" / "train.en.gz"
    assert gzip.decompress(path.read_bytes()) == b"hello\nworld\n"

    with pytest.raises(MtkitError, match="checksum mismatch.*expected sha256 0{64}"):
        resolve_file(_split(name="valid", sha256="0" * 64), "en")
    assert not (cat.cache_dir() / "toy" / "valid.en.gz").exists()
    assert not list((cat.cache_dir() / "downloads").glob("*valid*"))  # the bad download is deleted


def test_archive_members_are_extracted_and_converted(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, text in {
            "de-en/train.tags.de-en.en": "<url>http://x</url>\n<talkid>1</talkid>\n<title>A talk</title>\nHello .\n",
            "de-en/t.en.xml": '<doc>\n<seg id="1"> It\u2019s fine . </seg>\n</doc>\n',
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()

    def fake_download(url, dest, sha256=None, timeout=60.0):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(archive)
        return dest

    monkeypatch.setattr(cat, "download", fake_download)
    tags = _split(url=None, archive="https://example.org/de-en.tgz", member="de-en/train.tags.de-en.{lang}",
                  format="iwslt_tags")
    with gzip.open(resolve_file(tags, "en"), "rt", encoding="utf-8") as f:
        assert f.read().splitlines() == ["A talk", "Hello ."]
    xml = _split(name="t", url=None, archive="https://example.org/de-en.tgz", member="de-en/t.{lang}.xml",
                 format="iwslt_xml")
    with gzip.open(resolve_file(xml, "en"), "rt", encoding="utf-8") as f:
        assert f.read().splitlines() == ["It's fine ."]
    missing = _split(name="m", url=None, archive="https://example.org/de-en.tgz", member="nope.{lang}")
    with pytest.raises(MtkitError, match="has no member nope.en"):
        resolve_file(missing, "en")


def test_offline_error_names_the_files_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("MTKIT_OFFLINE", "1")
    c = load_catalog()
    with pytest.raises(MtkitError) as err:
        resolve_file(c.split("multi30k/train"), "de", data_dir=tmp_path / "here")
    msg = str(err.value)
    assert "\n" not in msg
    assert "train.de.gz" in msg and str(tmp_path / "here") in msg and str(cat.cache_dir() / "multi30k") in msg

    monkeypatch.delenv("MTKIT_OFFLINE")

    def unreachable(url, dest, sha256=None, timeout=60.0):
        raise dl.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(cat, "download", unreachable)
    with pytest.raises(MtkitError, match=r"could not download .*offline\? place train.de.gz in"):
        resolve_file(c.split("multi30k/train"), "de")


def test_sacrebleu_sources_are_fetched_through_sacrebleu(tmp_path, monkeypatch):
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("a\nb\n")
    ref.write_text("x\ny\n")
    calls = []

    def fake(test_set, langpair, side):
        calls.append((test_set, langpair, side))
        return str(src if side == "src" else ref)

    monkeypatch.setattr(cat, "sacrebleu_file", fake)
    split = load_catalog().split("wmt14_en_de/newstest2014")
    with gzip.open(resolve_file(split, "de"), "rt") as f:
        assert f.read() == "x\ny\n"
    with gzip.open(resolve_file(split, "en"), "rt") as f:
        assert f.read() == "a\nb\n"
    assert calls == [("wmt14/full", "en-de", "ref"), ("wmt14/full", "en-de", "src")]
    assert resolve_file(split, "de") == cat.cache_dir() / "wmt14_en_de" / "newstest2014.de.gz"
    assert len(calls) == 2  # the second time it comes from the cache


# --- the download path for real, through a local HTTP server ---------------------------------
class _Server:
    """Serves ``files`` (path -> bytes) on 127.0.0.1; paths in ``cut`` announce their full size
    and close the connection after half of it, ``cut[path]`` times."""

    def __init__(self):
        import http.server
        import threading

        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server API)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut.get(self.path, 0) > 0:
                    server.cut[self.path] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _payload(lines: list[str]) -> bytes:
    return gzip.compress("".join(f"{line}\n" for line in lines).encode())


def test_a_real_download_lands_in_the_cache_checked(server):
    body = _payload(["ein Hund", "eine Katze"] * 5000)
    server.files["/train.de.gz"] = body
    split = _split(url=server.url + "/train.{lang}.gz", sha256={"de": hashlib.sha256(body).hexdigest()})
    path = resolve_file(split, "de")
    assert path == cat.cache_dir() / "toy" / "train.de.gz" and path.read_bytes() == body
    assert not list(path.parent.glob("*.tmp-*")) and not list((cat.cache_dir() / "downloads").glob("*.tmp-*"))
    assert resolve_file(split, "de") == path and len(server.requests) == 1  # cached: not fetched again


def test_a_checksum_mismatch_names_the_file_and_keeps_nothing(server):
    server.files["/train.de.gz"] = _payload(["tampered"])
    split = _split(url=server.url + "/train.{lang}.gz", sha256={"de": "0" * 64})
    with pytest.raises(MtkitError) as err:
        resolve_file(split, "de")
    msg = str(err.value)
    assert "\n" not in msg and "train.de.gz" in msg and "0" * 64 in msg
    assert hashlib.sha256(server.files["/train.de.gz"]).hexdigest() in msg
    assert not [p for p in cat.cache_dir().rglob("*") if p.is_file()]


def test_an_interrupted_download_is_tried_again_and_never_cached_half(server):
    body = _payload([f"line {i}" for i in range(20000)])
    server.files["/train.de.gz"] = body
    server.cut["/train.de.gz"] = 1  # the first connection drops halfway
    split = _split(url=server.url + "/train.{lang}.gz")  # no checksum: only the byte count can tell
    assert resolve_file(split, "de").read_bytes() == body
    assert len(server.requests) == 2

    server.files["/train.en.gz"] = body
    server.cut["/train.en.gz"] = dl.DOWNLOAD_ATTEMPTS  # every attempt drops
    with pytest.raises(MtkitError, match=rf"download of .*train.en.gz failed {dl.DOWNLOAD_ATTEMPTS} times"):
        resolve_file(split, "en")
    assert not [p for p in cat.cache_dir().rglob("*en*") if p.is_file()]


def test_an_archive_member_is_downloaded_and_extracted(server):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for lang, text in (("en", "Hello .\n"), ("de", "Hallo .\n")):
            data = text.encode()
            info = tarfile.TarInfo(f"corpus/train.{lang}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    server.files["/corpus.tgz"] = buf.getvalue()
    split = _split(url=None, archive=server.url + "/corpus.tgz", member="corpus/train.{lang}")
    with gzip.open(resolve_file(split, "de"), "rt", encoding="utf-8") as f:
        assert f.read() == "Hallo .\n"
    with gzip.open(resolve_file(split, "en"), "rt", encoding="utf-8") as f:
        assert f.read() == "Hello .\n"
    assert server.requests == ["/corpus.tgz"]  # the archive is fetched once for both sides


def test_no_network_is_a_one_line_error_that_says_where_to_put_the_files(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    split = _split(url=f"http://127.0.0.1:{port}/train.{{lang}}.gz")
    with pytest.raises(MtkitError) as err:
        resolve_file(split, "de", data_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "could not download" in msg and f"place train.de.gz in {tmp_path}" in msg


def test_a_missing_data_dir_is_one_warning_then_the_cache(tmp_path, monkeypatch, caplog):
    cached = _gz(cat.cache_dir() / "toy" / "train.en.gz", ["cache"])
    missing = tmp_path / "no-such-dir"
    monkeypatch.setenv("MTKIT_DATA", str(missing))
    with caplog.at_level("WARNING", logger="mtkit.data.catalog"):
        assert resolve_file(_split(), "en") == cached
        assert resolve_file(_split(), "en") == cached
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "MTKIT_DATA" in warnings[0] and str(missing) in warnings[0]
