"""Command line for the data: `python -m vit.data download`, `python -m vit.data prepare` and
`python -m vit.data digits-folder`."""

from __future__ import annotations

import argparse
import string
import sys
import threading
import urllib.parse
from pathlib import Path

from vit.data import DEFAULT_DATA_DIR, LAYOUTS, DatasetError, found_image_size_refusal, load_dataset
from vit.data.cache import unreadable
from vit.data.download import DEFAULT_MD5, DEFAULT_URL, download


EXIT_DOWNLOAD_FAILED = 1  # the download or its check failed: run the same command again
EXIT_BAD_INPUT = 2  # a bad flag, or data that cannot be used as it is (as train.py's exit code 2)


def at_least(minimum: int):
    """argparse type: an integer >= minimum (argparse names the flag in its error). The twin of
    cmdline.positive_int: vit may not import cmdline (cmdline imports kernels, which import vit),
    and cmdline imports no vit module before --help (vit imports jax)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value
    return parse


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0, and no more than a socket can wait (inf, 1e300: an
    OverflowError from the first connection)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    if value > threading.TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {threading.TIMEOUT_MAX:.0f} seconds, got {text}")
    return value


def download_url(text: str) -> str:
    """argparse type: a URL that urllib can open (a bare word or a typo'd scheme used to end in
    a traceback from urllib, 'unknown url type')."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() not in ("http", "https", "ftp", "file") or not (parts.netloc or parts.path):
        raise argparse.ArgumentTypeError(f"must be an http://, https://, ftp:// or file:// URL, got {text!r}")
    return text


def md5_digest(text: str) -> str:
    """argparse type: 32 hexadecimal digits (anything else could only fail after the whole download)."""
    if len(text) != 32 or any(c not in string.hexdigits for c in text):
        raise argparse.ArgumentTypeError(f"must be an MD5 digest, 32 hexadecimal digits, got {text!r}")
    return text.lower()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vit.data",
        description="Get and prepare the datasets. Tiny ImageNet needs `download` once; `--dataset digits` "
        "(scikit-learn's 8x8 digits) needs nothing.",
        epilog=f"exit codes: 0 done; {EXIT_DOWNLOAD_FAILED} the download failed (run the same command again "
        f"to resume it); {EXIT_BAD_INPUT} a bad flag or unusable data (the message names it); 130 "
        "interrupted",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    get = commands.add_parser(
        "download",
        help="download, verify and unpack Tiny ImageNet (resumable)",
        description="Download Tiny ImageNet (about 248 MB), check its MD5 and unpack it to DEST/tiny-imagenet-200. "
        "Run again after an interruption to resume; a bad checksum deletes the partial file.",
    )
    get.add_argument(
        "--dest", default=DEFAULT_DATA_DIR, help="folder to put tiny-imagenet-200/ in (default: %(default)s)"
    )
    get.add_argument("--url", type=download_url, default=DEFAULT_URL,
                     help="where to download the zip from (default: %(default)s)")
    get.add_argument("--md5", type=md5_digest, default=DEFAULT_MD5,
                     help="expected MD5 of the zip (default: %(default)s)")
    get.add_argument("--retries", type=at_least(0), default=3,
                     help="resume this many times after a dropped connection (default: %(default)s)")
    get.add_argument("--timeout", type=positive_seconds, default=60.0,
                     help="seconds to wait for the server before failing (default: %(default)s)")
    get.add_argument("--keep-zip", action="store_true", help="keep the zip after unpacking it")
    get.add_argument("--quiet", action="store_true", help="no progress bars")

    prepare = commands.add_parser(
        "prepare",
        help="decode a folder dataset (Tiny ImageNet, or DIR/train/<class>/ + DIR/val/<class>/) into the .npy "
        "cache now (otherwise the first training run does it)",
    )
    prepare.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR,
        help="tiny-imagenet-200/ or its parent, or an image folder (default: %(default)s)"
    )
    prepare.add_argument("--layout", choices=LAYOUTS, default="auto", help="data.layout (default: detected)")
    prepare.add_argument("--image-size", type=at_least(1), default=None,
                         help="data.image_size: side of the cached images of an image folder (default 64)")
    prepare.add_argument("--split", choices=["train", "val", "both"], default="both",
                         help="which split's cache to build (default: both)")
    prepare.add_argument("--cache-dir", default=None,
                         help="data.cache_dir: a folder for the decoded images, in a sub-folder per dataset "
                         "(default: DATA_DIR/vitfuse-cache)")
    prepare.add_argument("--workers", type=at_least(1), default=None,
                         help="decoding processes (default: up to 8)")
    prepare.add_argument(
        "--skip-bad-images", action="store_true", help="leave out unreadable images instead of failing"
    )
    prepare.add_argument("--quiet", action="store_true", help="no progress bars")

    digits = commands.add_parser(
        "digits-folder",
        help="write scikit-learn's 8x8 digits as an image folder (DEST/train/<digit>/*.png, "
        "DEST/val/<digit>/*.png): the image-folder path and fine-tuning with no download",
    )
    digits.add_argument("dest", help="a new (or empty) folder")
    digits.add_argument("--classes", default=None, metavar="D,D,...",
                        help="only these digits, e.g. 0,1,2,3,4 (default: all ten)")
    return parser


def prepare(args) -> None:
    """Each split's cache, built now unless it is up to date; one line each saying which."""
    if why := found_image_size_refusal("tiny-imagenet", args.data_dir, args.layout, args.image_size):
        raise DatasetError(f"--image-size {args.image_size}: {why} (leave --image-size unset)")
    for split in ("train", "val") if args.split == "both" else (args.split,):
        data = load_dataset("tiny-imagenet", args.data_dir, split, workers=args.workers,
                            skip_bad_images=args.skip_bad_images, progress=not args.quiet,
                            image_size=args.image_size, layout=args.layout, cache_dir=args.cache_dir)
        skipped = f", {unreadable(len(data.skipped))} skipped" if data.skipped else ""
        how = "decoded now into" if data.decoded_now else "up to date in"
        print(f"{data.name} {split}: {data.images.shape[0]} images {data.images.shape[1:]}, "
              f"{data.num_classes} classes{skipped}; cache {how} {Path(data.images.filename).parent}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    where = f"{parser.prog} {args.command}"
    try:
        if args.command == "download":
            download(args.dest, args.url, args.md5, retries=args.retries, timeout=args.timeout,
                     keep_zip=args.keep_zip, progress=not args.quiet)
        elif args.command == "prepare":
            prepare(args)
        elif args.command == "digits-folder":
            from vit.data.digits import write_digits_folder  # noqa: PLC0415
            classes = None if args.classes is None else [c.strip() for c in args.classes.split(",")]
            counts = write_digits_folder(args.dest, classes)
            print(f"{args.dest}: {counts['train']} train / {counts['val']} val images of 8x8 "
                  f"digits ({args.classes or 'all ten'})")
    except DatasetError as e:  # a failed download is a DownloadError, one of them
        print(f"{where}: error: {e}", file=sys.stderr)
        return EXIT_DOWNLOAD_FAILED if args.command == "download" else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        again = ("run the same command again to resume (the bytes received are kept)"
                 if args.command == "download" else
                 "a cache half-built is not kept (one complete is): the same command builds "
                 "what is missing")
        print(f"\n{where}: interrupted; {again}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
