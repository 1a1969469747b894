"""Move a large file in parts and get it back byte for byte.

A machine that accepts only ~60 MiB per transfer and has no package index cannot receive the
93 MB SmolLM2 GGUF file whole. `split` cuts a file into equal parts beside a manifest in
`sha256sum` format (one line per part, one for the whole file); `join` concatenates the parts
and refuses the result unless every part and the whole match the manifest, so a truncated or
swapped part fails loudly instead of becoming a model with wrong weights.

    python -m qlab.reference.transfer split FILE --parts 2 --out DIR
    python -m qlab.reference.transfer join DIR/FILE.part00 DIR/FILE.part01 --out FILE

`sha256sum -c FILE.sha256` checks the parts with coreutils alone.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

MiB = 1 << 20
MAX_PART_BYTES = 48 * MiB  # under the ~60 MiB transfer cap with room for the rest of a call
CHUNK = 4 * MiB


class ChecksumError(ValueError):
    """A file or part whose SHA-256 is not the recorded one."""


def sha256_files(paths) -> str:
    """SHA-256 over the bytes of `paths` in the order given: one file's is `sha256sum`'s; several
    files' is the identity of a model's or an adapter's weights (store.files_sha256)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def manifest_path(part: Path) -> Path:
    """`x.gguf.part00` -> `x.gguf.sha256`, beside the parts."""
    return part.with_name(part.name.rsplit(".part", 1)[0] + ".sha256")


def split(path: Path, parts: int, out_dir: Path, max_part_bytes: int = MAX_PART_BYTES) -> list[Path]:
    """Cut `path` into `parts` parts of equal size (the last one shorter) in `out_dir`, with the
    manifest `<name>.sha256`. Refuses a part count that leaves a part over `max_part_bytes`."""
    path, out_dir = Path(path), Path(out_dir)
    size = path.stat().st_size
    per_part = -(-size // parts)  # ceil: 98,362,432 B / 2 = 49,181,216 B = 46.9 MiB per part
    if per_part > max_part_bytes:
        need = -(-size // max_part_bytes)
        raise ValueError(f"{path.name}: {parts} parts of {per_part / MiB:.1f} MiB exceed "
                         f"{max_part_bytes / MiB:.0f} MiB; use at least {need} parts")
    out_dir.mkdir(parents=True, exist_ok=True)
    written, lines, whole = [], [], hashlib.sha256()
    with open(path, "rb") as src:
        for i in range(parts):
            part = out_dir / f"{path.name}.part{i:02d}"
            h, left = hashlib.sha256(), per_part
            with open(part, "wb") as dst:
                while left and (block := src.read(min(CHUNK, left))):
                    dst.write(block)
                    h.update(block)
                    whole.update(block)
                    left -= len(block)
            written.append(part)
            lines.append(f"{h.hexdigest()}  {part.name}")
    lines.append(f"{whole.hexdigest()}  {path.name}")
    (out_dir / f"{path.name}.sha256").write_text("\n".join(lines) + "\n")
    return written


def read_manifest(manifest: Path) -> dict[str, str]:
    """{file name: sha256} from a `sha256sum`-format file."""
    out = {}
    for line in manifest.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*")] = digest
    return out


def join(parts: list[Path], out: Path, sha256: str | None = None) -> Path:
    """Concatenate `parts` (in the order given) into `out` and return it.

    The whole file must hash to `sha256`, or, when it is None, to the manifest beside the first
    part (whose per-part lines also name a bad part). The result is written to a temporary file
    and renamed into place only once it matches: a failed join leaves no `out`."""
    parts, out = [Path(p) for p in parts], Path(out)
    if not parts:
        raise ValueError("join: no parts given")
    expected_parts: dict[str, str] = {}
    if sha256 is None:
        manifest = manifest_path(parts[0])
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: no manifest beside the parts; pass sha256=")
        expected_parts = read_manifest(manifest)
        if out.name not in expected_parts:
            raise ChecksumError(f"{manifest} has no line for {out.name}")
        sha256 = expected_parts[out.name]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                h = hashlib.sha256()
                with open(part, "rb") as src:
                    while block := src.read(CHUNK):
                        dst.write(block)
                        h.update(block)
                        whole.update(block)
                want = expected_parts.get(part.name)
                if want is not None and h.hexdigest() != want:
                    raise ChecksumError(f"{part}: sha256 {h.hexdigest()}, manifest says {want}")
        if whole.hexdigest() != sha256:
            raise ChecksumError(f"{out.name} joined from {len(parts)} parts: sha256 {whole.hexdigest()}, "
                                f"expected {sha256} (a part missing, truncated or out of order)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlab.reference.transfer", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="cut FILE into parts plus a .sha256 manifest")
    s.add_argument("file", type=Path)
    s.add_argument("--parts", type=int, required=True)
    s.add_argument("--out", type=Path, required=True, help="directory for the parts")
    j = sub.add_parser("join", help="join parts into --out, verified against the manifest or --sha256")
    j.add_argument("parts", type=Path, nargs="+")
    j.add_argument("--out", type=Path, required=True)
    j.add_argument("--sha256", default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            for p in split(args.file, args.parts, args.out):
                print(f"{p}  {p.stat().st_size / MiB:.1f} MiB")
        else:
            print(join(args.parts, args.out, args.sha256))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
