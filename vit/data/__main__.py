"""Command line for the data: `python -m vit.data download` and `python -m vit.data prepare`."""

from __future__ import annotations

import argparse
import sys

from vit.data import DEFAULT_DATA_DIR, LAYOUTS, DatasetError, load_dataset
from vit.data.download import DEFAULT_MD5, DEFAULT_URL, download


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vit.data",
        description="Get and prepare the datasets. Tiny ImageNet needs `download` once; `--dataset digits` "
        "(scikit-learn's 8x8 digits) needs nothing.",
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
    get.add_argument("--url", default=DEFAULT_URL, help="where to download the zip from (default: %(default)s)")
    get.add_argument("--md5", default=DEFAULT_MD5, help="expected MD5 of the zip (default: %(default)s)")
    get.add_argument("--retries", type=int, default=3, help="resume this many times after a dropped connection")
    get.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server before failing")
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
    prepare.add_argument("--image-size", type=int, default=None,
                         help="data.image_size: side of the cached images of an image folder (default 64)")
    prepare.add_argument("--split", choices=["train", "val", "both"], default="both")
    prepare.add_argument("--workers", type=int, default=None, help="decoding processes (default: up to 8)")
    prepare.add_argument(
        "--skip-bad-images", action="store_true", help="leave out unreadable images instead of failing"
    )
    prepare.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "download":
            download(args.dest, args.url, args.md5, retries=args.retries, timeout=args.timeout,
                     keep_zip=args.keep_zip, progress=not args.quiet)
        elif args.command == "prepare":
            for split in ("train", "val") if args.split == "both" else (args.split,):
                data = load_dataset("tiny-imagenet", args.data_dir, split, workers=args.workers,
                                    skip_bad_images=args.skip_bad_images, progress=not args.quiet,
                                    image_size=args.image_size, layout=args.layout)
                skipped = f", {len(data.skipped)} unreadable images skipped" if data.skipped else ""
                print(f"{data.name} {split}: {data.images.shape[0]} images {data.images.shape[1:]}, "
                      f"{data.num_classes} classes{skipped}")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
