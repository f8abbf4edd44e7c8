"""`python -m vit.data download` against a loopback HTTP server serving a small zip in the real layout."""

import hashlib
import http.server
import io
import re
import shutil
import stat
import threading
import zipfile

import numpy as np
import pytest

from vit.data import __main__ as cli
from vit.data import load_dataset
from vit.data.download import DownloadError, download
from vit.data.fake import write_fake_tiny_imagenet


def zip_folder(folder, extra_members=()):
    """Zip `folder` as tiny-imagenet-200/..., plus (ZipInfo or name, bytes) extra members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            arcname = "tiny-imagenet-200/" + path.relative_to(folder).as_posix()
            if path.is_dir():
                archive.writestr(arcname + "/", b"")
            else:
                archive.write(path, arcname)
        for member, data in extra_members:
            archive.writestr(member, data)
    return buffer.getvalue()


class LoopbackServer:
    """Serves `payload` at http://127.0.0.1:PORT/tiny.zip, with the misbehaviours the tests need.

    cut_after: the first `cuts` responses send only this many body bytes, then close the connection.
    honor_range: answer "Range: bytes=N-" with 206 Partial Content; False answers 200 with the whole file.
    wrong_range: answer "Range: bytes=N-" with 206 Partial Content of bytes 0- (not the range asked for).
    """

    def __init__(self, payload, *, cut_after=None, cuts=1, honor_range=True, status=None, wrong_range=False):
        self.payload, self.cut_after, self.cuts = payload, cut_after, cuts
        self.honor_range, self.status, self.wrong_range = honor_range, status, wrong_range
        self.ranges = []  # the Range header of each request (None if absent)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.ranges.append(self.headers.get("Range"))
                if owner.status:
                    self.send_error(owner.status)
                    return
                data, start = owner.payload, 0
                requested = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if requested and owner.honor_range:
                    start = 0 if owner.wrong_range else int(requested[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if owner.cut_after is not None and owner.cuts > 0:
                    owner.cuts -= 1
                    self.wfile.write(body[: owner.cut_after])
                    self.close_connection = True  # the socket closes with Content-Length not reached
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # urllib honours proxy variables; loopback requests must go straight to the test server.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory):
    root = write_fake_tiny_imagenet(tmp_path_factory.mktemp("src"), num_classes=2, train_per_class=3, val_images=4)
    payload = zip_folder(root)
    return payload, hashlib.md5(payload).hexdigest()


def get(dest, server, md5, **kw):
    kw.setdefault("retries", 0)
    # the socket timeout only guards against a hang: generous, so that load cannot trip it
    return download(dest, server.url, md5, retry_wait=0, timeout=120, progress=False, **kw)


def test_good_zip_is_extracted_into_a_dataset_that_loads(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    dest = tmp_path / "data"
    (dest / ".tiny-imagenet-200.extract-old").mkdir(parents=True)  # left by a killed extraction
    with LoopbackServer(payload) as server:
        root = get(dest, server, md5)
    assert root == dest / "tiny-imagenet-200"
    assert sorted(p.name for p in dest.iterdir()) == ["tiny-imagenet-200"]  # zip, .part, temp dirs all gone
    train = load_dataset("tiny-imagenet", dest, "train", workers=1, progress=False)
    assert train.images.shape == (6, 64, 64, 3) and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(load_dataset("tiny-imagenet", dest, "val", workers=1, progress=False)) == 4


def test_dropped_connection_keeps_the_part_and_the_next_run_resumes(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    dest = tmp_path / "data"
    cut = len(payload) // 3
    with LoopbackServer(payload, cut_after=cut) as server:
        with pytest.raises(DownloadError, match="resume") as e:
            get(dest, server, md5)
        part = dest / "tiny-imagenet-200.zip.part"
        assert str(part) in str(e.value)
        assert part.read_bytes() == payload[:cut]
        assert not (dest / "tiny-imagenet-200").exists()
        get(dest, server, md5, keep_zip=True)
        assert server.ranges == [None, f"bytes={cut}-"]
    assert (dest / "tiny-imagenet-200.zip").read_bytes() == payload
    assert (dest / "tiny-imagenet-200" / "wnids.txt").is_file()


def test_failed_download_with_nothing_received_claims_no_part_file(tmp_path, dataset_zip):
    """A refused connection, or one closed before the first byte: the error says nothing was
    received, and names no .part file (none is left)."""
    payload, md5 = dataset_zip
    with LoopbackServer(payload) as server:
        url = server.url
    part = tmp_path / "tiny-imagenet-200.zip.part"
    with pytest.raises(DownloadError) as e:  # the server is gone: connection refused
        download(tmp_path, url, md5, retries=0, retry_wait=0, timeout=120, progress=False)
    assert "nothing was received" in str(e.value).lower() and ".part" not in str(e.value), str(e.value)
    assert not part.exists()
    with LoopbackServer(payload, cut_after=0) as server:
        with pytest.raises(DownloadError) as e:
            get(tmp_path, server, md5)
    assert "nothing was received" in str(e.value).lower() and ".part" not in str(e.value), str(e.value)
    assert not part.exists()


def test_dropped_connection_is_retried_in_the_same_run(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    with LoopbackServer(payload, cut_after=1000, cuts=2) as server:
        get(tmp_path, server, md5, retries=2, keep_zip=True)
        assert server.ranges == [None, "bytes=1000-", "bytes=2000-"]
    assert (tmp_path / "tiny-imagenet-200.zip").read_bytes() == payload


def test_server_that_ignores_range_makes_us_restart_from_zero(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(b"stale bytes from another file" * 10)
    with LoopbackServer(payload, honor_range=False) as server:
        get(tmp_path, server, md5, keep_zip=True)
        assert server.ranges == ["bytes=290-"]  # asked to resume, got the whole file
    assert (tmp_path / "tiny-imagenet-200.zip").read_bytes() == payload


def test_partial_content_of_another_range_is_not_appended(tmp_path, dataset_zip):
    # a 206 for bytes 0- when bytes=100- was asked: appending it would corrupt the file, so the
    # .part is dropped and the retry downloads from the start
    payload, md5 = dataset_zip
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(payload[:100])
    with LoopbackServer(payload, wrong_range=True) as server:
        get(tmp_path, server, md5, retries=1, keep_zip=True)
        assert server.ranges == ["bytes=100-", None]
    assert (tmp_path / "tiny-imagenet-200.zip").read_bytes() == payload


def test_checksum_may_be_given_in_upper_case(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    with LoopbackServer(payload) as server:
        assert get(tmp_path, server, md5.upper()) == tmp_path / "tiny-imagenet-200"
    assert (tmp_path / "tiny-imagenet-200" / "wnids.txt").is_file()


def test_complete_part_file_is_verified_not_downloaded_again(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(payload)
    with LoopbackServer(payload) as server:
        get(tmp_path, server, md5)
        assert server.ranges == [f"bytes={len(payload)}-"]  # answered 416: nothing left to send
    assert (tmp_path / "tiny-imagenet-200" / "wnids.txt").is_file()


def test_a_kept_zip_is_reused_only_if_its_checksum_matches(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    kept = tmp_path / "tiny-imagenet-200.zip"
    kept.write_bytes(payload)  # from an earlier run with keep_zip
    with LoopbackServer(payload) as server:
        get(tmp_path, server, md5, keep_zip=True)
        assert server.ranges == []  # verified, not downloaded again
    shutil.rmtree(tmp_path / "tiny-imagenet-200")
    kept.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # one bit off: not the file
    with LoopbackServer(payload) as server:
        get(tmp_path, server, md5, keep_zip=True)
        assert server.ranges == [None]  # downloaded anew, from the start
    assert kept.read_bytes() == payload and (tmp_path / "tiny-imagenet-200" / "wnids.txt").is_file()


def test_wrong_checksum_is_an_error_and_nothing_is_extracted(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    with LoopbackServer(payload) as server:
        with pytest.raises(DownloadError, match="checksum mismatch") as e:
            get(tmp_path, server, "0" * 32)
    assert md5 in str(e.value) and "0" * 32 in str(e.value)
    assert list(tmp_path.iterdir()) == []  # the bad .part is deleted (documented), nothing extracted


def _symlink_member():
    info = zipfile.ZipInfo("tiny-imagenet-200/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, b"/etc/passwd"


@pytest.mark.parametrize(
    "member",
    [
        ("../escape.txt", b"x"),
        ("tiny-imagenet-200/../../escape.txt", b"x"),
        ("tiny-imagenet-200/val/../escape.txt", b"x"),  # stays inside, but '..' is refused all the same
        ("/tmp/escape.txt", b"x"),
        ("C:/escape.txt", b"x"),
        _symlink_member(),
    ],
    ids=["dotdot", "nested-dotdot", "inner-dotdot", "absolute", "drive", "symlink"],
)
def test_unsafe_zip_member_is_refused_and_nothing_is_extracted(tmp_path, dataset_zip, member):
    src = write_fake_tiny_imagenet(tmp_path / "src", num_classes=1, train_per_class=1, val_images=1)
    payload = zip_folder(src, [member])
    dest = tmp_path / "out" / "data"
    with LoopbackServer(payload) as server:
        with pytest.raises(DownloadError, match="refusing to extract") as e:
            get(dest, server, hashlib.md5(payload).hexdigest())
    name = member[0].filename if isinstance(member[0], zipfile.ZipInfo) else member[0]
    assert repr(name) in str(e.value)
    assert not (dest / "tiny-imagenet-200").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["tiny-imagenet-200.zip"]  # no temp folder left
    assert not list((tmp_path / "out").rglob("escape.txt"))
    assert not list(tmp_path.rglob("escape.txt"))


def test_zip_without_the_dataset_folder_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("something/else.txt", b"hello")
    payload = buffer.getvalue()
    with LoopbackServer(payload) as server:
        with pytest.raises(DownloadError, match="tiny-imagenet-200/wnids.txt"):
            get(tmp_path, server, hashlib.md5(payload).hexdigest())
    assert not (tmp_path / "tiny-imagenet-200").exists()


def test_http_error_is_reported_without_retrying(tmp_path):
    with LoopbackServer(b"", status=404) as server:
        with pytest.raises(DownloadError, match="HTTP 404"):
            get(tmp_path, server, "0" * 32, retries=3)
        assert len(server.ranges) == 1


@pytest.mark.parametrize("status", [500, 503])
def test_server_error_is_retried(tmp_path, status, capsys):
    with LoopbackServer(b"", status=status) as server:
        with pytest.raises(DownloadError, match=f"HTTP Error {status}"):
            get(tmp_path, server, "0" * 32, retries=2)
        assert len(server.ranges) == 3
    # nothing received: no "interrupted ... resuming from byte 0" (seen when DNS failed)
    err = capsys.readouterr().err
    assert f"download failed (HTTP Error {status}" in err and "trying again from the start (retry 1 " \
        "of 2)" in err and "(retry 2 of 2)" in err and "resuming" not in err, err


def test_range_not_satisfiable_without_a_part_file_is_an_error(tmp_path):
    # 416 means "the .part is complete" only when a range was asked for
    with LoopbackServer(b"", status=416) as server:
        with pytest.raises(DownloadError, match="HTTP 416"):
            get(tmp_path, server, "0" * 32, retries=3)
        assert server.ranges == [None]
    assert list(tmp_path.iterdir()) == []


def test_dataset_folder_without_wnids_is_not_taken_for_a_download(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    (tmp_path / "tiny-imagenet-200" / "train").mkdir(parents=True)
    with LoopbackServer(payload) as server:
        with pytest.raises(DownloadError, match="has no wnids.txt"):
            get(tmp_path, server, md5)
        assert server.ranges == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-imagenet-200"]


def test_existing_dataset_is_left_alone(tmp_path, dataset_zip):
    payload, md5 = dataset_zip
    (tmp_path / "tiny-imagenet-200").mkdir()
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_text("n00000001\n")
    with LoopbackServer(payload) as server:
        assert get(tmp_path, server, md5) == tmp_path / "tiny-imagenet-200"
        assert server.ranges == []


def test_download_command_end_to_end(tmp_path, dataset_zip, capsys):
    payload, md5 = dataset_zip
    with LoopbackServer(payload) as server:
        rc = cli.main(["download", "--dest", str(tmp_path), "--url", server.url, "--md5", md5, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    val = load_dataset("tiny-imagenet", tmp_path / "tiny-imagenet-200", "val", workers=1, progress=False)
    assert val.images.dtype == np.uint8 and len(val) == 4
    assert not (tmp_path / "tiny-imagenet-200.zip").exists()  # deleted once unpacked, unless --keep-zip
    with LoopbackServer(payload) as server:
        assert cli.main(["download", "--dest", str(tmp_path / "k"), "--url", server.url, "--md5", md5,
                         "--keep-zip", "--quiet"]) == 0
    assert (tmp_path / "k" / "tiny-imagenet-200.zip").read_bytes() == payload
    with LoopbackServer(payload) as server:
        rc = cli.main(["download", "--dest", str(tmp_path / "x"), "--url", server.url, "--md5", "f" * 32, "--quiet"])
    assert rc == 1 and "checksum mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--url", "nonsense", "must be an http://, https://, ftp:// or file:// URL, got 'nonsense'"),
    ("--url", "htp://example.org/x.zip", "URL, got 'htp://example.org/x.zip'"),
    ("--md5", "xyz", "must be an MD5 digest, 32 hexadecimal digits, got 'xyz'"),
    ("--md5", "g" * 32, "32 hexadecimal digits"),
])
def test_a_bad_url_or_md5_is_a_usage_error_naming_the_flag(tmp_path, capsys, flag, value, message):
    """Before anything is fetched: a URL urllib cannot open used to be a traceback ('unknown url
    type'), and an MD5 that is not one could only fail after the whole download."""
    with pytest.raises(SystemExit) as e:
        cli.main(["download", "--dest", str(tmp_path / "d"), flag, value, "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: must be" in err and message in err and "Traceback" not in err, err
    assert not (tmp_path / "d").exists()


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "download" in out and "prepare" in out
