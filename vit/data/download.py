"""Download and unpack Tiny ImageNet: resumable, checksummed, and never leaving a half dataset behind.

    python -m vit.data download --dest data        # -> data/tiny-imagenet-200/

Steps, each safe to interrupt:
1. Fetch the zip into <dest>/tiny-imagenet-200.zip.part. A .part left by an earlier run is resumed with an
   HTTP Range request; a server that ignores Range (answers 200) makes us start again from byte 0. A
   connection that drops is retried (`retries`), each time resuming from what has arrived.
2. Check the MD5. On a mismatch the .part is deleted (resuming a corrupt file can never succeed, and the next
   run should start clean), the error says so, and nothing is extracted. A good file is renamed to .zip.
3. Check every zip member before extracting anything: absolute paths, `..` components and symbolic links are
   refused (an error, nothing extracted), so no file can land outside <dest>.
4. Extract into a temporary folder inside <dest>, then rename its tiny-imagenet-200/ to
   <dest>/tiny-imagenet-200 in one step: that folder exists only once it is complete. The zip is then deleted
   unless keep_zip=True.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from vit.data.common import DatasetError
from vit.data.tiny_imagenet import DATASET_DIRNAME
from vit.progress import progress_bar

DEFAULT_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
DEFAULT_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
DEFAULT_SIZE = 248_100_043  # bytes, for reference: the checksum is what is verified
EXTRACT_PREFIX = f".{DATASET_DIRNAME}.extract-"


class DownloadError(DatasetError):
    """The download, its checksum or its extraction failed; the message says what was kept."""


class _ShortRead(Exception):
    """The server closed the connection before sending Content-Length bytes."""


def md5sum(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _fetch_once(url: str, part: Path, *, timeout: float, progress: bool) -> None:
    """One HTTP request appending to part (resuming from its size); raises on a short or failed transfer."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "vitfuse-data"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return  # "Range Not Satisfiable": the .part already holds the whole file; the checksum decides
        raise
    with response:
        status = getattr(response, "status", None)
        content_range = response.headers.get("Content-Range", "")
        if offset and status == 206 and re.match(rf"bytes {offset}-", content_range):
            mode = "ab"
        elif status == 206:
            # Some other range than the one asked for: appending it would corrupt the file.
            part.unlink(missing_ok=True)
            raise _ShortRead(f"the server sent range {content_range!r}, not bytes {offset}-; starting over")
        else:
            if offset:
                _log(f"the server ignored the request to resume at byte {offset}; downloading from the start")
            offset, mode = 0, "wb"
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        total = offset + length if length is not None else None
        received = 0
        with open(part, mode) as f, progress_bar(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"downloading {url.rsplit('/', 1)[-1]}",
            disable=not progress,
            file=sys.stderr,
        ) as bar:
            while data := response.read(1 << 20):
                f.write(data)
                received += len(data)
                bar.update(len(data))
        # http.client returns b"" (not an error) when the peer closes early, so count the bytes ourselves.
        if length is not None and received < length:
            raise _ShortRead(f"connection closed after {offset + received:,} of {total:,} bytes")


def fetch(url: str, part: Path, *, retries: int = 3, retry_wait: float = 2.0, timeout: float = 60.0,
          progress: bool = True) -> None:
    """Download url into part, resuming what part already holds; retry dropped connections."""
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout=timeout, progress=progress)
            return
        except urllib.error.HTTPError as e:
            if e.code < 500:  # 404, 403...: retrying will not help
                raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
            error: Exception = e
        except (_ShortRead, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
        kept = part.stat().st_size if part.exists() else 0
        if not kept:
            part.unlink(missing_ok=True)  # an empty .part is no progress to keep
        if attempt == retries:
            if not kept:
                raise DownloadError(f"download of {url} failed: {error}. Nothing was received; "
                                    f"run the same command again to retry") from error
            raise DownloadError(
                f"download of {url} failed: {error}. The {kept:,} bytes received are kept in {part}; "
                f"run the same command again to resume"
            ) from error
        again = f"resuming from byte {kept:,}" if kept else "trying again from the start"
        _log(f"download {'interrupted' if kept else 'failed'} ({error}); {again} (retry {attempt + 1} of {retries})")
        time.sleep(retry_wait * (attempt + 1))


def check_members(archive: zipfile.ZipFile, zip_path: Path) -> None:
    """Refuse the whole archive if any member could be written outside the extraction folder."""
    for info in archive.infolist():
        name = info.filename
        reason = None
        if stat.S_ISLNK(info.external_attr >> 16):
            reason = "is a symbolic link"
        else:
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
                reason = "has an absolute path"
            elif ".." in parts:
                reason = "has a '..' component"
        if reason:
            raise DownloadError(
                f"refusing to extract {zip_path}: member {name!r} {reason}, which could write outside the "
                f"destination; nothing was extracted"
            )


def extract_dataset(zip_path: Path, dest: Path, *, progress: bool = True) -> Path:
    """Safely unpack zip_path's tiny-imagenet-200/ to dest/tiny-imagenet-200, appearing only when complete."""
    final = dest / DATASET_DIRNAME
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{zip_path} is not a readable zip file: {e}") from e
    with archive:
        check_members(archive, zip_path)
        names = {info.filename.rstrip("/") for info in archive.infolist()}
        if f"{DATASET_DIRNAME}/wnids.txt" not in names:
            raise DownloadError(f"{zip_path} has no {DATASET_DIRNAME}/wnids.txt: not a Tiny ImageNet archive")
        tmp = Path(tempfile.mkdtemp(prefix=EXTRACT_PREFIX, dir=dest))
        try:
            root = tmp.resolve()
            for info in progress_bar(archive.infolist(), desc="extracting", unit="file",
                                     disable=not progress, file=sys.stderr):
                target = (tmp / info.filename).resolve()
                if not target.is_relative_to(root):  # belt and braces after check_members
                    raise DownloadError(f"refusing to extract {info.filename!r} from {zip_path}: outside {dest}")
                archive.extract(info, tmp)
            os.rename(tmp / DATASET_DIRNAME, final)
        except (zipfile.BadZipFile, OSError) as e:
            raise DownloadError(f"extracting {zip_path} into {dest} failed: {e}; nothing was kept") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def download(
    dest: str | os.PathLike = "data",
    url: str = DEFAULT_URL,
    md5: str = DEFAULT_MD5,
    *,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    keep_zip: bool = False,
    progress: bool = True,
) -> Path:
    """Download, verify and unpack Tiny ImageNet into dest/tiny-imagenet-200; returns that folder."""
    dest = Path(dest).expanduser()
    final = dest / DATASET_DIRNAME
    if (final / "wnids.txt").is_file():
        _log(f"{final} is already there; nothing to do")
        return final
    if final.exists():
        raise DownloadError(
            f"{final} exists but has no wnids.txt (not made by this command, which only creates it complete); "
            f"remove it and run again"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for leftover in dest.glob(EXTRACT_PREFIX + "*"):  # from an extraction that was killed
            _log(f"removing {leftover}, left by an interrupted extraction")
            shutil.rmtree(leftover, ignore_errors=True)
    except OSError as e:
        raise DownloadError(f"cannot write to {dest}: {e}") from e

    zip_path = dest / f"{DATASET_DIRNAME}.zip"
    part = zip_path.with_name(zip_path.name + ".part")
    md5 = md5.lower()
    if zip_path.exists() and md5sum(zip_path) == md5:
        _log(f"using the verified {zip_path} from an earlier run")
    else:
        zip_path.unlink(missing_ok=True)
        fetch(url, part, retries=retries, retry_wait=retry_wait, timeout=timeout, progress=progress)
        got = md5sum(part)
        if got != md5:
            size = part.stat().st_size
            part.unlink()
            raise DownloadError(
                f"checksum mismatch for {url}: MD5 {got} ({size:,} bytes), expected {md5}. Deleted {part} "
                f"(resuming a corrupt file cannot repair it) and extracted nothing; run again to download anew"
            )
        os.replace(part, zip_path)
    final = extract_dataset(zip_path, dest, progress=progress)
    if not keep_zip:
        zip_path.unlink()
    _log(f"Tiny ImageNet is in {final}")
    return final
