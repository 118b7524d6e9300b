"""Long Python source files as calibration / evaluation documents, copied under numbered names (no download).

    python benchmarks/copy_docs.py DOCS [--min-bytes 8000] [--more MORE --more-mb 24]

DOCS: the standard library's .py files of at least --min-bytes (test folders and site-packages left out).
MORE (optional): up to --more-mb MB of the host's library .py files of at least 16 KB (site/dist-packages), not
already in DOCS. Files are taken in sorted path order, so the same host gives the same documents.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sysconfig


def pick(root: str, min_size: int) -> list:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                  if f.endswith(".py") and "test" not in d.lower() and os.path.getsize(os.path.join(d, f)) >= min_size)


def copy_all(paths: list, dst: str, width: int) -> None:
    os.makedirs(dst)
    for i, p in enumerate(paths):
        shutil.copyfile(p, os.path.join(dst, f"{i:0{width}d}-{os.path.basename(p)}"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("docs")
    ap.add_argument("--min-bytes", type=int, default=8_000)
    ap.add_argument("--more", default=None)
    ap.add_argument("--more-mb", type=float, default=24.0)
    args = ap.parse_args()
    std = sysconfig.get_paths()["stdlib"]
    files = [p for p in pick(std, args.min_bytes) if "site-packages" not in p and "dist-packages" not in p]
    copy_all(files, args.docs, 4)
    msg = f"{len(files)} stdlib files >= {args.min_bytes} bytes from {std}"
    if args.more:
        roots = sorted({sysconfig.get_paths()["purelib"], "/usr/lib/python3/dist-packages",
                        "/usr/local/lib/python3.12/dist-packages"})
        lib, total, seen = [], 0, set(files)
        for r in roots:
            for p in pick(r, 16_000) if os.path.isdir(r) else []:
                if total >= args.more_mb * 1e6 or p in seen:
                    continue
                lib.append(p)
                seen.add(p)
                total += os.path.getsize(p)
        copy_all(lib, args.more, 5)
        msg += f"; {len(lib)} library files >= 16 KB ({total / 1e6:.1f} MB) from {roots}"
    print(msg)


if __name__ == "__main__":
    main()
