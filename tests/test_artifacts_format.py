"""The hardened format: schema export, semver ranges, and the strict `.detox` archive reader.

Every malformed or malicious input must be refused by the CLI with exit status != 0 and a message that
names the problem, and nothing may appear in the cache or at the output path.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from detox.artifacts import ArtifactError, load_artifact
from detox.artifacts.archive import pack, unpack
from detox.artifacts.manifest import FORMAT_VERSION
from detox.artifacts.semver import Range, Version, sort_versions
from detox.data import sha256_file
from detox.cli.main import main
from detox.runtime import Calibrator

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DETOX_CACHE", str(root))
    return root


@pytest.fixture
def art(tmp_path, aligned_llama) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(aligned_llama, dst)
    return dst


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def members_of(directory: Path) -> list[tuple[str, bytes]]:
    names = ["manifest.json", *sorted(json.loads((directory / "manifest.json").read_text())["files"])]
    return [(n, (directory / n).read_bytes()) for n in names]


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> Path:
    """A tar made with the standard library, so tests can build archives the detox writer never would."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def refused(args: list, match: str, *must_not_exist: Path) -> None:
    result = cli(*args)
    assert result.exit_code != 0, result.output
    assert match in result.output, result.output
    assert "Traceback" not in result.output
    for p in must_not_exist:
        assert not p.exists(), f"{p} was written although the input was refused"


def cache_is_empty(cache: Path) -> bool:
    unpacked = cache / "unpacked"
    return not unpacked.exists() or not [p for p in unpacked.iterdir()]


# ---------------------------------------------------------------- schema and semver


def test_exported_json_schema_is_up_to_date():
    from detox.artifacts.schema import render

    on_disk = (DOCS / "manifest.schema.json").read_text(encoding="utf-8")
    assert on_disk == render(), "docs/manifest.schema.json is stale: python -m detox.artifacts.schema docs/manifest.schema.json"
    schema = json.loads(on_disk)
    assert schema["properties"]["format_version"]["const"] == FORMAT_VERSION
    assert schema["additionalProperties"] is False


def test_schema_describes_real_manifests(aligned_llama):
    schema = json.loads((DOCS / "manifest.schema.json").read_text())
    raw = json.loads((aligned_llama / "manifest.json").read_text())
    assert set(raw) <= set(schema["properties"]) and set(schema["required"]) <= set(raw)


@pytest.mark.parametrize("spec,expected", [
    ("^1.2", "1.10.0"), ("~1.2", "1.2.9"), (">=1.2 <1.3", "1.2.9"), ("1.2.0", "1.2.0"), ("=1.2.0", "1.2.0"),
    ("^0.2", "0.2.5"), ("^0.2.5", "0.2.5"), ("~0", "0.2.5"), ("1.x", "1.10.0"), ("*", "2.0.0"), ("", "2.0.0"),
    (">1.2", "2.0.0"), ("<=1.2", "1.2.9"), ("<1.2", "1.0.0"), ("^2.0.0-rc.1", "2.0.0"), ("1.2 || 0.1", "1.2.9"),
    ("^3", None), (">=1.3.0-beta.1 <1.4", "1.3.0"), ("~1.3.0-beta.1 <1.3.0", "1.3.0-beta.2"),
])
def test_semver_ranges(spec, expected):
    versions = ["0.1.0", "0.2.0", "0.2.5", "1.0.0", "1.2.0", "1.2.9", "1.3.0", "1.10.0", "2.0.0-rc.1", "2.0.0", "1.3.0-beta.2"]
    assert Range.parse(spec).best(versions) == expected


def test_semver_ordering():
    assert sort_versions(["1.0.0", "1.0.0-rc.1", "1.0.0-alpha", "1.0.0-alpha.1", "0.9.10", "0.9.9", "junk"], newest_first=False) == [
        "0.9.9", "0.9.10", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-rc.1", "1.0.0"]
    assert not Range.parse("^1.2").matches("2.0.0-rc.1")  # pre-releases only when asked for
    with pytest.raises(ValueError, match="not a semantic version"):
        Version.parse("1.2")


# ---------------------------------------------------------------- archives that are fine


def test_archive_round_trip_and_load(art, tmp_path, cache):
    archive = pack(art, tmp_path / "a.detox")
    assert pack(art, tmp_path / "b.detox").read_bytes() == archive.read_bytes()  # deterministic: content-addressable
    with tarfile.open(archive) as tar:  # a plain tar that standard tools can list
        assert tar.getnames()[0] == "manifest.json"
    loaded = load_artifact(archive)
    assert loaded.manifest == load_artifact(art).manifest
    assert loaded.path == cache / "unpacked" / sha256_file(archive)
    cal = Calibrator.load(archive)
    assert cal.stream().hidden_for("hello world").shape == (cal.manifest.calibrator.hidden_size,)
    out = unpack(archive, tmp_path / "unpacked")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in art.iterdir())


def test_cli_pack_unpack_show(art, tmp_path):
    r = cli("artifacts", "pack", art, "--out", tmp_path / "x.detox")
    assert r.exit_code == 0, r.output
    r = cli("artifacts", "show", tmp_path / "x.detox")
    assert r.exit_code == 0 and json.loads(r.output)["name"] == "tiny-cal"
    r = cli("artifacts", "unpack", tmp_path / "x.detox", "--out", tmp_path / "y")
    assert r.exit_code == 0 and (tmp_path / "y" / "manifest.json").is_file()
    r = cli("artifacts", "verify", tmp_path / "x.detox")
    assert r.exit_code == 0 and "NOT CHECKED" in r.output and "files match" in r.output


# ---------------------------------------------------------------- refused, through the CLI


def test_flipped_byte_in_weights(art, tmp_path, cache):
    p = art / "calibrator.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    members = [(n, bytes(data) if n == p.name else b) for n, b in members_of(art)]
    p.write_bytes(bytes(data))
    refused(["artifacts", "verify", art], "calibrator.safetensors does not match its sha256")
    refused(["artifacts", "pack", art, "--out", tmp_path / "x.detox"], "sha256", tmp_path / "x.detox")
    archive = write_tar(tmp_path / "flipped.detox", members)
    refused(["artifacts", "unpack", archive, "--out", tmp_path / "out"], "does not match its sha256", tmp_path / "out")
    refused(["artifacts", "verify", archive], "does not match its sha256")
    assert cache_is_empty(cache)


def test_missing_file(art, tmp_path, cache):
    members = [m for m in members_of(art) if m[0] != "tokenizer.json"]
    (art / "tokenizer.json").unlink()
    refused(["artifacts", "verify", art], "missing file(s) ['tokenizer.json']")
    archive = write_tar(tmp_path / "missing.detox", members)
    refused(["artifacts", "unpack", archive, "--out", tmp_path / "out"], "missing file(s)", tmp_path / "out")
    assert cache_is_empty(cache)


def test_extra_unexpected_file(art, tmp_path, cache):
    members = members_of(art) + [("evil.pkl", b"\x80\x04K\x01.")]
    (art / "evil.pkl").write_bytes(b"\x80\x04K\x01.")
    refused(["artifacts", "verify", art], "unexpected file(s) ['evil.pkl']")
    archive = write_tar(tmp_path / "extra.detox", members)
    refused(["artifacts", "unpack", archive, "--out", tmp_path / "out"], "unexpected file 'evil.pkl'", tmp_path / "out")
    # a name the format knows (optional calibrator.onnx) but this manifest does not list is just as unexpected
    raw = json.loads((art / "manifest.json").read_text())
    raw["files"].pop("calibrator.onnx", None)
    listed = [(n, (art / n).read_bytes()) for n in sorted(raw["files"])]
    onnx = write_tar(tmp_path / "onnx.detox", [("manifest.json", json.dumps(raw).encode()), *listed, ("calibrator.onnx", b"\x08\x01")])
    refused(["artifacts", "verify", onnx], "unexpected file 'calibrator.onnx'")
    assert cache_is_empty(cache)


@pytest.mark.parametrize("evil", ["../x", "../../x", "ABSOLUTE", "sub/tokenizer.json", "..", "C:evil"])
def test_path_traversal_name_in_archive(art, tmp_path, cache, evil):
    evil = str(tmp_path / "abs-x") if evil == "ABSOLUTE" else evil  # absolute, yet harmless if a bug ever wrote it
    archive = write_tar(tmp_path / "evil.detox", members_of(art) + [(evil, b"owned")])
    out = tmp_path / "deep" / "out"
    refused(["artifacts", "unpack", archive, "--out", out], "unsafe path", out)
    refused(["artifacts", "verify", archive], "unsafe path")
    escaped = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"owned"]
    assert escaped == [], f"archive member written outside the artifact: {escaped}"
    assert cache_is_empty(cache)


def test_links_devices_dirs_and_extension_headers_are_refused(art, tmp_path, cache):
    def with_member(info: tarfile.TarInfo, fmt: int = tarfile.USTAR_FORMAT) -> Path:
        path = tmp_path / f"{info.name.replace('/', '_')}-{info.type!r}.detox"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in members_of(art):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            tar.addfile(info, io.BytesIO(b"") if info.isreg() else None)
        return path

    link = tarfile.TarInfo("signature.ed25519")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    refused(["artifacts", "verify", with_member(link)], "is a symbolic link")
    hard = tarfile.TarInfo("signature.ed25519")
    hard.type, hard.linkname = tarfile.LNKTYPE, "manifest.json"
    refused(["artifacts", "verify", with_member(hard)], "is a hard link")
    folder = tarfile.TarInfo("signature.ed25519")
    folder.type = tarfile.DIRTYPE
    refused(["artifacts", "verify", with_member(folder)], "is a directory")
    fifo = tarfile.TarInfo("signature.ed25519")
    fifo.type = tarfile.FIFOTYPE
    refused(["artifacts", "verify", with_member(fifo)], "is a FIFO")
    pax = tarfile.TarInfo("signature.ed25519")
    pax.pax_headers = {"comment": "x"}
    refused(["artifacts", "verify", with_member(pax, tarfile.PAX_FORMAT)], "pax header")
    assert cache_is_empty(cache)


def test_structural_problems_are_refused(art, tmp_path, cache):
    members = members_of(art)
    refused(["artifacts", "verify", write_tar(tmp_path / "order.detox", members[1:] + members[:1])],
            "manifest.json must be the archive's first member")
    refused(["artifacts", "verify", write_tar(tmp_path / "dup.detox", members + members[1:2])], "appears twice")
    grown = [(n, b + b"x" if n == "tokenizer.json" else b) for n, b in members]
    refused(["artifacts", "verify", write_tar(tmp_path / "size.detox", grown)], "but its manifest says")
    junk = tmp_path / "junk.detox"
    junk.write_bytes(pack(art, tmp_path / "ok.detox").read_bytes() + b"trailing data")
    refused(["artifacts", "verify", junk], "data after its end-of-archive marker")
    gz = tmp_path / "gz.detox"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(art / "manifest.json", arcname="manifest.json")
    refused(["artifacts", "verify", gz], "is compressed")
    garbage = tmp_path / "garbage.detox"
    garbage.write_bytes(os.urandom(4096))
    refused(["artifacts", "verify", garbage], "corrupt tar header")
    assert cache_is_empty(cache)


def test_resource_limits(art, tmp_path, cache, monkeypatch):
    archive = pack(art, tmp_path / "a.detox")
    monkeypatch.setenv("DETOX_MAX_ARTIFACT_BYTES", "1000")
    # the manifest (read first, at most 1 MiB) declares more bytes than allowed: refused before extracting them
    refused(["artifacts", "verify", archive], "over the limit of 1000")
    huge = tmp_path / "huge.detox"
    huge.write_bytes(archive.read_bytes() + bytes(3 << 20))
    refused(["artifacts", "verify", huge], "larger than the artifact size limit")
    assert cache_is_empty(cache)


@pytest.mark.parametrize("where", ["in a header", "in the manifest", "in the last member", "before the end marker"])
def test_truncated_archive(art, tmp_path, cache, where):
    archive = pack(art, tmp_path / "full.detox")
    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive marker starts
    cut = {"in a header": 100, "in the manifest": 612, "in the last member": end - 700, "before the end marker": end}[where]
    truncated = tmp_path / "truncated.detox"
    truncated.write_bytes(archive.read_bytes()[:cut])
    out = tmp_path / "out"
    refused(["artifacts", "unpack", truncated, "--out", out], "truncated", out)
    refused(["artifacts", "verify", truncated], "truncated")
    with pytest.raises(ArtifactError, match="truncated"):
        Calibrator.load(truncated)
    assert cache_is_empty(cache)


class _Boom:
    """Unpickling this would create ``marker``: proof that detox never unpickles artifact bytes."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("rehash", [False, True])
def test_pickle_disguised_as_weights(art, tmp_path, cache, rehash):
    marker = tmp_path / "UNPICKLED"
    evil = pickle.dumps({"weights": _Boom(marker)})
    p = art / "calibrator.safetensors"
    p.write_bytes(evil)
    if rehash:  # a careful attacker fixes the manifest so the hash check passes: safetensors parsing must still refuse
        mpath = art / "manifest.json"
        raw = json.loads(mpath.read_text())
        raw["files"]["calibrator.safetensors"] = {"sha256": sha256_file(p), "size": len(evil)}
        mpath.write_text(json.dumps(raw))
    match = "could not read artifact files" if rehash else "corrupted or tampered"
    refused(["artifacts", "verify", art], match)
    archive = write_tar(tmp_path / "pickle.detox", members_of(art))
    refused(["artifacts", "unpack", archive, "--out", tmp_path / "out"], match, tmp_path / "out")
    with pytest.raises(ArtifactError, match=match):
        Calibrator.load(archive)
    assert not marker.exists(), "a pickle inside an artifact was executed"
    assert cache_is_empty(cache)


def test_no_pickle_loader_anywhere_in_the_artifact_path():
    root = Path(__file__).resolve().parents[1]
    for rel in ["artifacts", "sdk/runtime.py", "sdk/resolve.py", "sdk/wrapping.py", "cli/artifacts.py"]:
        for f in ([root / rel] if rel.endswith(".py") else sorted((root / rel).glob("*.py"))):
            text = f.read_text()
            for banned in ("import pickle", "torch.load(", "allow_pickle=True", "pickle.load", "extractall(", ".extract("):
                assert banned not in text, f"{f} uses {banned}"


@pytest.mark.parametrize("version,match", [(FORMAT_VERSION + 1, "newer than this detox supports"), (0, "old artifact format")])
def test_unknown_format_version(art, tmp_path, cache, version, match):
    mpath = art / "manifest.json"
    raw = json.loads(mpath.read_text())
    raw["format_version"] = version
    raw["a_field_from_the_future"] = {"x": 1}  # the version check comes first, so users see "upgrade", not a schema error
    mpath.write_text(json.dumps(raw))
    refused(["artifacts", "verify", art], match)
    refused(["artifacts", "show", art], match)
    archive = write_tar(tmp_path / "future.detox", members_of(art))
    refused(["artifacts", "unpack", archive, "--out", tmp_path / "out"], match, tmp_path / "out")
    refused(["artifacts", "show", archive], match)
    assert cache_is_empty(cache)
