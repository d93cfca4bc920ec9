"""The Flickr8k/FACC downloader against a real HTTP server on 127.0.0.1 that honours Range."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from nlmm.data.download import download_flickr8k, missing_archives
from nlmm.errors import NlmmError

NAMES = ("Flickr8k_Dataset.zip", "Flickr8k_text.zip", "flickr_audio.tar.gz")


def jpeg_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (np.sin(np.arange(1600) / 5) * 8000).astype(np.int16), 16000, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


IMAGES = {"1000_0a1b2c3d4e.jpg": jpeg_bytes((200, 30, 30)),
          "1001_5f6a7b8c9d.jpg": jpeg_bytes((30, 30, 200))}
TOKENS = "".join(f"{name}#{n}\tA shape on a background .\n" for name in IMAGES for n in range(5))
WAV = wav_bytes()
ARCHIVES = {
    "Flickr8k_Dataset.zip": make_zip({
        **{f"Flicker8k_Dataset/{k}": v for k, v in IMAGES.items()},
        "__MACOSX/Flicker8k_Dataset/._1000_0a1b2c3d4e.jpg": b"\x00\x05\x16\x07mac",
    }),
    "Flickr8k_text.zip": make_zip({
        "Flickr8k.token.txt": TOKENS.encode(),
        "Flickr_8k.trainImages.txt": b"1000_0a1b2c3d4e.jpg\n",
        "Flickr_8k.devImages.txt": b"1001_5f6a7b8c9d.jpg\n",
        "Flickr_8k.testImages.txt": b"",
        "__MACOSX/._Flickr8k.token.txt": b"\x00\x05\x16\x07mac",
    }),
    "flickr_audio.tar.gz": make_tar_gz({
        "flickr_audio/wavs/1000_0a1b2c3d4e_0.wav": WAV,
        "flickr_audio/wav2capt.txt": b"1000_0a1b2c3d4e_0.wav 1000_0a1b2c3d4e.jpg #0\n",
        "flickr_audio/wav2spk.txt": b"1000_0a1b2c3d4e_0.wav 1\n",
    }),
}
# The fakes' own checksums; without them the module's published ones must reject the fakes.
MD5S = {name: hashlib.md5(data).hexdigest() for name, data in ARCHIVES.items()}


class ArchiveServer:
    """Serves byte strings by path; honours `Range: bytes=N-` unless told to ignore it."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.drop_first: dict[str, int] = {}  # path -> bytes sent before the connection drops
        self.ignore_range = False
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                state.requests.append((self.path, range_header))
                body = state.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                start = int(match.group(1)) if match and not state.ignore_range else 0
                if start >= len(body) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if start:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = state.drop_first.pop(self.path, None)
                self.wfile.write(body[start:] if cut is None else body[start:start + cut])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def urls(self) -> dict[str, str]:
        return {name: self.url(name) for name in NAMES}


@pytest.fixture
def server() -> Iterator[ArchiveServer]:
    srv = ArchiveServer({f"/{name}": data for name, data in ARCHIVES.items()})
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_full_download_unpacks_into_the_public_layout(server: ArchiveServer,
                                                      tmp_path: Path) -> None:
    dest = tmp_path / "flickr8k"
    assert download_flickr8k(dest, urls=server.urls(), md5s=MD5S, progress=True) == dest
    for name, data in IMAGES.items():
        assert (dest / "Flickr8k_Dataset" / name).read_bytes() == data
    assert not (dest / "Flicker8k_Dataset").exists()
    assert (dest / "Flickr8k_text" / "Flickr8k.token.txt").read_text() == TOKENS
    assert (dest / "Flickr8k_text" / "Flickr_8k.trainImages.txt").is_file()
    assert (dest / "flickr_audio" / "wavs" / "1000_0a1b2c3d4e_0.wav").read_bytes() == WAV
    assert (dest / "flickr_audio" / "wav2capt.txt").read_text().startswith("1000_0a1b2c3d4e_0.wav")
    assert not [p for p in dest.rglob("*") if "__MACOSX" in p.parts or p.name.startswith("._")]
    assert sorted(p.name for p in (dest / "downloads").iterdir()) == []  # archives removed
    assert sorted(server.requests) == sorted((f"/{n}", None) for n in NAMES)


def test_second_call_with_everything_in_place_does_nothing(server: ArchiveServer,
                                                           tmp_path: Path) -> None:
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    server.requests.clear()
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False)
    assert server.requests == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_interrupted_download_resumes_with_a_range_request_on_the_next_call(
        server: ArchiveServer, tmp_path: Path) -> None:
    name = "flickr_audio.tar.gz"
    server.drop_first[f"/{name}"] = 100
    with pytest.raises(NlmmError, match="rerun to resume"):
        download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False,
                          retries=0, keep_archives=True)
    part = tmp_path / "downloads" / f"{name}.part"
    assert part.read_bytes() == ARCHIVES[name][:100]
    assert not (tmp_path / "downloads" / name).exists()

    server.requests.clear()
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False,
                      keep_archives=True)
    assert server.requests == [(f"/{name}", "bytes=100-")]
    assert (tmp_path / "downloads" / name).read_bytes() == ARCHIVES[name]
    assert not part.exists()
    assert (tmp_path / "flickr_audio" / "wavs" / "1000_0a1b2c3d4e_0.wav").read_bytes() == WAV


def test_a_dropped_connection_is_resumed_within_the_same_call(server: ArchiveServer,
                                                              tmp_path: Path) -> None:
    name = "Flickr8k_Dataset.zip"
    server.drop_first[f"/{name}"] = 300
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False,
                      keep_archives=True)
    assert [r for r in server.requests if r[0] == f"/{name}"] == [(f"/{name}", None),
                                                                  (f"/{name}", "bytes=300-")]
    assert (tmp_path / "downloads" / name).read_bytes() == ARCHIVES[name]


def test_a_server_that_ignores_range_restarts_the_file_from_zero(server: ArchiveServer,
                                                                 tmp_path: Path) -> None:
    name = "Flickr8k_text.zip"
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / f"{name}.part").write_bytes(b"stale bytes from another file")
    server.ignore_range = True
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False,
                      keep_archives=True)
    assert (f"/{name}", "bytes=29-") in server.requests
    assert (tmp_path / "downloads" / name).read_bytes() == ARCHIVES[name]
    assert (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").read_text() == TOKENS


def test_md5_mismatch_keeps_the_file_unpacks_nothing_and_says_so(server: ArchiveServer,
                                                                  tmp_path: Path) -> None:
    # Only FACC's fake is given its own checksum: the published MD5 of the real FACC archive
    # must reject these bytes, and nothing of it may land in the corpus.
    md5s = {"Flickr8k_text.zip": MD5S["Flickr8k_text.zip"],
            "Flickr8k_Dataset.zip": MD5S["Flickr8k_Dataset.zip"]}
    with pytest.raises(NlmmError, match=r"failed the MD5 check of flickr_audio\.tar\.gz.*nothing "
                                        r"was unpacked; delete it"):
        download_flickr8k(tmp_path, urls=server.urls(), md5s=md5s, progress=False)
    part = tmp_path / "downloads" / "flickr_audio.tar.gz.part"
    assert part.read_bytes() == ARCHIVES["flickr_audio.tar.gz"]
    assert not (tmp_path / "downloads" / "flickr_audio.tar.gz").exists()
    assert not (tmp_path / "flickr_audio").exists()

    # a rerun does not unpack the kept bytes either; deleting them, as told, fetches them anew
    server.requests.clear()
    with pytest.raises(NlmmError, match="MD5"):
        download_flickr8k(tmp_path, urls=server.urls(), md5s=md5s, progress=False)
    assert not (tmp_path / "flickr_audio").exists()
    part.unlink()
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False)
    assert (tmp_path / "flickr_audio" / "wavs" / "1000_0a1b2c3d4e_0.wav").read_bytes() == WAV


def test_bogus_flickr8k_zips_fail_the_published_checksums_before_unpacking(
        server: ArchiveServer, tmp_path: Path) -> None:
    # The case: well-formed zips holding one random-byte image and a one-line caption
    # file. No checksum override: the module's own MD5s of the real zips must refuse them.
    server.files["/Flickr8k_Dataset.zip"] = make_zip(
        {"Flicker8k_Dataset/123_abc.jpg": bytes(range(256)) * 4})
    server.files["/Flickr8k_text.zip"] = make_zip(
        {"Flickr8k.token.txt": b"123_abc.jpg#0\tA thing .\n"})
    with pytest.raises(NlmmError, match=r"failed the MD5 check of Flickr8k_text\.zip"):
        download_flickr8k(tmp_path, urls=server.urls(), progress=False)
    assert not (tmp_path / "Flickr8k_text").exists()
    assert (tmp_path / "downloads" / "Flickr8k_text.zip.part").read_bytes() == \
        server.files["/Flickr8k_text.zip"]

    # with good text in place, the images zip is refused the same way
    (tmp_path / "downloads" / "Flickr8k_text.zip.part").unlink()
    server.files["/Flickr8k_text.zip"] = ARCHIVES["Flickr8k_text.zip"]
    with pytest.raises(NlmmError, match=r"failed the MD5 check of Flickr8k_Dataset\.zip"):
        download_flickr8k(tmp_path, urls=server.urls(),
                          md5s={"Flickr8k_text.zip": MD5S["Flickr8k_text.zip"]}, progress=False)
    assert (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").read_text() == TOKENS
    assert not (tmp_path / "Flickr8k_Dataset").exists()
    assert not (tmp_path / "Flicker8k_Dataset").exists()
    assert (tmp_path / "downloads" / "Flickr8k_Dataset.zip.part").read_bytes() == \
        server.files["/Flickr8k_Dataset.zip"]


def test_an_archive_lacking_files_the_captions_name_is_kept_and_not_unpacked(
        server: ArchiveServer, tmp_path: Path) -> None:
    # A checksum that matches (a mirror's, say) does not make a zip complete: the images zip
    # must hold every image that the caption and split files name.
    short = make_zip({"Flicker8k_Dataset/1000_0a1b2c3d4e.jpg": IMAGES["1000_0a1b2c3d4e.jpg"]})
    server.files["/Flickr8k_Dataset.zip"] = short
    md5s = {**MD5S, "Flickr8k_Dataset.zip": hashlib.md5(short).hexdigest()}
    with pytest.raises(NlmmError, match=r"Flickr8k_Dataset\.zip lacks 1 file\(s\) that the corpus "
                                        r"names \(1001_5f6a7b8c9d\.jpg\), so nothing was unpacked"):
        download_flickr8k(tmp_path, urls=server.urls(), md5s=md5s, progress=False)
    assert (tmp_path / "downloads" / "Flickr8k_Dataset.zip").read_bytes() == short
    assert not (tmp_path / "Flickr8k_Dataset").exists()
    assert not list((tmp_path / "downloads").glob("*.unpacked"))


def test_an_incomplete_image_folder_is_not_taken_for_the_images(server: ArchiveServer,
                                                                 tmp_path: Path) -> None:
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False)
    (tmp_path / "Flickr8k_Dataset" / "1001_5f6a7b8c9d.jpg").unlink()
    assert missing_archives(tmp_path) == ["Flickr8k_Dataset.zip"]

    server.requests.clear()
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False)
    assert server.requests == [("/Flickr8k_Dataset.zip", None)]
    assert (tmp_path / "Flickr8k_Dataset" / "1001_5f6a7b8c9d.jpg").read_bytes() == \
        IMAGES["1001_5f6a7b8c9d.jpg"]
    assert missing_archives(tmp_path) == []


def test_missing_wavs_and_split_files_make_their_parts_incomplete(server: ArchiveServer,
                                                                  tmp_path: Path) -> None:
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False)
    (tmp_path / "flickr_audio" / "wavs" / "1000_0a1b2c3d4e_0.wav").unlink()
    (tmp_path / "Flickr8k_text" / "Flickr_8k.testImages.txt").unlink()
    assert missing_archives(tmp_path) == ["Flickr8k_text.zip", "flickr_audio.tar.gz"]
    (tmp_path / "Flickr8k_text" / "Flickr_8k.testImages.txt").write_text("")
    assert missing_archives(tmp_path) == ["flickr_audio.tar.gz"]


def test_a_rerun_over_the_corpus_bogus_zips_left_behind_replaces_it(server: ArchiveServer,
                                                                    tmp_path: Path) -> None:
    # What the unverified download used to leave: one random-byte image, a one-line caption
    # file and no split files. A rerun must see that it is no Flickr8k and fetch the real parts.
    (tmp_path / "Flicker8k_Dataset").mkdir()
    (tmp_path / "Flicker8k_Dataset" / "123_abc.jpg").write_bytes(bytes(range(256)))
    (tmp_path / "Flickr8k_text").mkdir()
    (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").write_text("123_abc.jpg#0\tA thing .\n")
    download_flickr8k(tmp_path, urls=server.urls(), md5s=MD5S, progress=False)
    assert {r[0] for r in server.requests} == {f"/{n}" for n in NAMES}
    assert (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").read_text() == TOKENS
    for name, data in IMAGES.items():
        assert (tmp_path / "Flickr8k_Dataset" / name).read_bytes() == data
    assert missing_archives(tmp_path) == []


def test_unreachable_host_fails_fast_naming_what_to_put_where(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    urls = {n: f"http://127.0.0.1:{closed_port}/{n}" for n in NAMES}
    dest = tmp_path / "data"
    start = time.monotonic()
    with pytest.raises(NlmmError) as caught:
        download_flickr8k(dest, urls=urls, progress=False, timeout=3.0)
    assert time.monotonic() - start < 5.0
    message = str(caught.value)
    assert "Flickr8k_Dataset.zip" in message and str(dest / "downloads") in message
    assert all(url in message for url in urls.values())
    assert "nlmm data synth" in message


def test_contents_already_unpacked_by_hand_need_no_network(tmp_path: Path) -> None:
    # complete by the counts its own files name: every captioned image, every mapped wav
    (tmp_path / "Flicker8k_Dataset").mkdir()
    for name, data in IMAGES.items():
        (tmp_path / "Flicker8k_Dataset" / name).write_bytes(data)
    (tmp_path / "Flickr8k_text").mkdir()
    (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").write_text(TOKENS)
    for split_file in ("trainImages", "devImages", "testImages"):
        (tmp_path / "Flickr8k_text" / f"Flickr_8k.{split_file}.txt").write_text("")
    (tmp_path / "flickr_audio" / "wavs").mkdir(parents=True)
    (tmp_path / "flickr_audio" / "wavs" / "1000_0a1b2c3d4e_0.wav").write_bytes(WAV)
    (tmp_path / "flickr_audio" / "wav2capt.txt").write_text(
        "1000_0a1b2c3d4e_0.wav 1000_0a1b2c3d4e.jpg #0\n")
    unreachable = {n: f"http://127.0.0.1:9/{n}" for n in NAMES}
    assert download_flickr8k(tmp_path, urls=unreachable, progress=False) == tmp_path
    assert not (tmp_path / "downloads").exists()


def test_archives_placed_in_downloads_by_hand_are_verified_and_used_offline(
        tmp_path: Path) -> None:
    (tmp_path / "downloads").mkdir()
    for name, data in ARCHIVES.items():
        (tmp_path / "downloads" / name).write_bytes(data)
    unreachable = {n: f"http://127.0.0.1:9/{n}" for n in NAMES}
    download_flickr8k(tmp_path, urls=unreachable, md5s=MD5S, progress=False)
    assert (tmp_path / "flickr_audio" / "wavs" / "1000_0a1b2c3d4e_0.wav").read_bytes() == WAV
    assert (tmp_path / "Flickr8k_Dataset" / "1001_5f6a7b8c9d.jpg").is_file()

    other = tmp_path / "other"
    (other / "downloads").mkdir(parents=True)
    for name, data in ARCHIVES.items():
        (other / "downloads" / name).write_bytes(data)
    with pytest.raises(NlmmError, match="MD5"):
        download_flickr8k(other, urls=unreachable, md5s={**MD5S, "flickr_audio.tar.gz": "0" * 32},
                          progress=False)
    # a file someone placed there is never deleted for them, and never unpacked
    assert (other / "downloads" / "flickr_audio.tar.gz").read_bytes() == \
        ARCHIVES["flickr_audio.tar.gz"]
    assert not (other / "flickr_audio").exists()


def test_archive_paths_that_escape_the_destination_are_refused(server: ArchiveServer,
                                                               tmp_path: Path) -> None:
    hostile = make_zip({"Flickr8k.token.txt": TOKENS.encode(), "../../escaped.txt": b"owned"})
    server.files["/Flickr8k_text.zip"] = hostile
    dest = tmp_path / "a" / "b"
    with pytest.raises(NlmmError, match="unsafe path"):
        download_flickr8k(dest, urls=server.urls(), progress=False,
                          md5s={**MD5S, "Flickr8k_text.zip": hashlib.md5(hostile).hexdigest()})
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (dest / "Flickr8k_text").exists()
