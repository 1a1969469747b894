"""qlab.reference.transfer: a file cut into parts beside a sha256sum-format manifest and joined
back byte for byte; a corrupted, truncated, missing or reordered part failing loudly and leaving
no output. (SmolLM2's real GGUF file travelling in two parts: tests/reference/test_gguf.py.)"""

import hashlib
import os
import shutil
import subprocess

import pytest

from qlab.reference import transfer


# -- split / join -------------------------------------------------------------------------------

@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(1_000_003))  # not a multiple of the part count
    return path


def test_split_join_round_trip(blob, tmp_path):
    parts = transfer.split(blob, 3, tmp_path / "parts", max_part_bytes=400_000)
    assert [p.name for p in parts] == ["model.gguf.part00", "model.gguf.part01", "model.gguf.part02"]
    assert [p.stat().st_size for p in parts] == [333_335, 333_335, 333_333]  # ceil(1,000,003 / 3)
    manifest = transfer.read_manifest(tmp_path / "parts" / "model.gguf.sha256")
    assert manifest["model.gguf"] == transfer.sha256_file(blob)
    out = transfer.join(parts, tmp_path / "back" / "model.gguf")
    assert out.read_bytes() == blob.read_bytes()


def test_join_refuses_a_wrong_part(blob, tmp_path):
    parts = transfer.split(blob, 2, tmp_path / "parts")
    data = bytearray(parts[1].read_bytes())
    data[1234] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    out = tmp_path / "back" / "model.gguf"
    with pytest.raises(transfer.ChecksumError, match="part01"):
        transfer.join(parts, out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing half-written left


def test_join_refuses_parts_out_of_order_or_missing(blob, tmp_path):
    parts = transfer.split(blob, 2, tmp_path / "parts")
    digest = transfer.sha256_file(blob)
    with pytest.raises(transfer.ChecksumError, match="expected"):
        transfer.join(parts[::-1], tmp_path / "a.gguf", sha256=digest)
    with pytest.raises(transfer.ChecksumError, match="expected"):
        transfer.join(parts[:1], tmp_path / "b.gguf", sha256=digest)


def test_split_refuses_parts_over_the_cap(blob, tmp_path):
    with pytest.raises(ValueError, match="at least 3 parts"):
        transfer.split(blob, 2, tmp_path / "parts", max_part_bytes=400_000)


def test_transfer_cli(blob, tmp_path):
    assert transfer.main(["split", str(blob), "--parts", "2", "--out", str(tmp_path / "p")]) == 0
    parts = sorted(str(p) for p in (tmp_path / "p").glob("*.part*"))
    assert transfer.main(["join", *parts, "--out", str(tmp_path / "j" / "model.gguf")]) == 0
    assert (tmp_path / "j" / "model.gguf").read_bytes() == blob.read_bytes()


# -- the manifest --------------------------------------------------------------------------------

def test_manifest_holds_each_part_and_the_whole_in_sha256sum_format(blob, tmp_path):
    parts = transfer.split(blob, 3, tmp_path / "parts", max_part_bytes=400_000)
    manifest = tmp_path / "parts" / "model.gguf.sha256"
    assert transfer.manifest_path(parts[2]) == manifest
    lines = manifest.read_text().splitlines()
    # one line per part in order, then the whole file: "<64 hex>  <name>"
    assert [line.split("  ")[1] for line in lines] == [p.name for p in parts] + ["model.gguf"]
    assert all(len(line.split("  ")[0]) == 64 for line in lines)
    digests = transfer.read_manifest(manifest)
    for p in parts:  # each part's line is that part's own digest, computed independently here
        assert digests[p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert digests["model.gguf"] == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert sum(p.stat().st_size for p in parts) == blob.stat().st_size


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils sha256sum not installed")
def test_coreutils_sha256sum_checks_the_parts(blob, tmp_path):
    transfer.split(blob, 2, tmp_path / "parts")
    # the whole file is not beside the parts: --ignore-missing checks the parts alone
    ok = subprocess.run(["sha256sum", "-c", "--ignore-missing", "model.gguf.sha256"], cwd=tmp_path / "parts",
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(": OK") == 2, ok.stdout + ok.stderr
    part = tmp_path / "parts" / "model.gguf.part00"
    part.write_bytes(part.read_bytes()[:-1])  # truncated by one byte
    bad = subprocess.run(["sha256sum", "-c", "--ignore-missing", "model.gguf.sha256"], cwd=tmp_path / "parts",
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "model.gguf.part00: FAILED" in bad.stdout


def test_read_manifest_accepts_binary_mode_lines_and_blank_lines(tmp_path):
    manifest = tmp_path / "x.sha256"
    manifest.write_text("aa" * 32 + " *x.part00\n\n" + "bb" * 32 + "  x\n")
    assert transfer.read_manifest(manifest) == {"x.part00": "aa" * 32, "x": "bb" * 32}


# -- more ways a join must fail ------------------------------------------------------------------

def test_join_refuses_a_truncated_part_and_leaves_nothing(blob, tmp_path):
    parts = transfer.split(blob, 2, tmp_path / "parts")
    parts[0].write_bytes(parts[0].read_bytes()[:-10])
    out = tmp_path / "back" / "model.gguf"
    with pytest.raises(transfer.ChecksumError, match="part00"):
        transfer.join(parts, out)
    assert list(out.parent.iterdir()) == []  # neither the file nor its temporary


def test_join_with_the_manifest_refuses_a_missing_or_swapped_part(blob, tmp_path):
    parts = transfer.split(blob, 3, tmp_path / "parts", max_part_bytes=400_000)
    # each given part is intact, so only the whole file's digest can tell
    with pytest.raises(transfer.ChecksumError, match="a part missing, truncated or out of order"):
        transfer.join([parts[0], parts[2]], tmp_path / "a" / "model.gguf")
    # swapped: 00 and 01 have the same size, so their per-part lines stay silent; the whole fails
    with pytest.raises(transfer.ChecksumError, match="expected"):
        transfer.join([parts[1], parts[0], parts[2]], tmp_path / "b" / "model.gguf")
    assert not (tmp_path / "a" / "model.gguf").exists() and not (tmp_path / "b" / "model.gguf").exists()


def test_join_without_a_manifest_or_its_line_fails(blob, tmp_path):
    parts = transfer.split(blob, 2, tmp_path / "parts")
    with pytest.raises(transfer.ChecksumError, match="has no line for other.gguf"):
        transfer.join(parts, tmp_path / "other.gguf")  # the manifest names model.gguf only
    (tmp_path / "parts" / "model.gguf.sha256").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest beside the parts"):
        transfer.join(parts, tmp_path / "model.gguf")
    # an explicit digest needs no manifest
    out = transfer.join(parts, tmp_path / "model.gguf", sha256=transfer.sha256_file(blob))
    assert out.read_bytes() == blob.read_bytes()
    with pytest.raises(ValueError, match="no parts"):
        transfer.join([], tmp_path / "x.gguf")


def test_join_replaces_an_existing_output_only_when_it_matches(blob, tmp_path):
    parts = transfer.split(blob, 2, tmp_path / "parts")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with pytest.raises(transfer.ChecksumError):
        transfer.join(parts[:1], out, sha256=transfer.sha256_file(blob))
    assert out.read_bytes() == b"old"  # a failed join never touches what was there
    transfer.join(parts, out)
    assert out.read_bytes() == blob.read_bytes()


# -- split's edges -------------------------------------------------------------------------------

def test_split_of_an_exact_multiple_and_into_one_part(tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(4 * 1000))
    parts = transfer.split(src, 4, tmp_path / "four")
    assert [p.stat().st_size for p in parts] == [1000] * 4
    one = transfer.split(src, 1, tmp_path / "one")
    assert [p.name for p in one] == ["f.bin.part00"] and one[0].read_bytes() == src.read_bytes()
    assert transfer.join(one, tmp_path / "back" / "f.bin").read_bytes() == src.read_bytes()


def test_cli_reports_a_bad_part_as_an_error_with_exit_1(blob, tmp_path, capsys):
    assert transfer.main(["split", str(blob), "--parts", "2", "--out", str(tmp_path / "p")]) == 0
    part = tmp_path / "p" / "model.gguf.part01"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    parts = [str(tmp_path / "p" / f"model.gguf.part0{i}") for i in range(2)]
    assert transfer.main(["join", *parts, "--out", str(tmp_path / "j" / "model.gguf")]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "j" / "model.gguf").exists()
    # a file that is not there: exit 1 too, not a traceback
    assert transfer.main(["split", str(tmp_path / "missing.bin"), "--parts", "2", "--out", str(tmp_path / "q")]) == 1
    assert "missing.bin" in capsys.readouterr().err
