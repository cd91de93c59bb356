"""Fault injection and malformed input against the artifact registry and every artifact file detox reads.

* ``kill -9`` at each named step of ``detox artifacts push``, ``pull`` and ``rm`` (real CLI processes; the code
  SIGKILLs itself where ``$DETOX_FAULT_POINT`` names the step), then the same command again: nothing lost,
  nothing duplicated, every visible archive indexed with its sha256, ``list``/``pull`` work.
* A registry poisoned by hand (invalid names and versions, unreadable archives, malformed ``index.json``): one
  warning line per bad entry, the rest still listed and pulled, and the printed ``rm`` command removes it.
* A table of malformed inputs for each artifact file (manifest, signature, index, archive): one-line error,
  exit status 1, no traceback, nothing written.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from detox.artifacts import ArtifactError, load_artifact
from detox.artifacts.archive import pack
from detox.artifacts.registry import RegistryError, open_registry
from detox.artifacts.semver import Range, RangeError, Version
from detox.data import sha256_file
from detox.cli.main import main

from test_artifacts_registry import cli, ok  # the registry tests' CLI helpers

ROOT = Path(__file__).resolve().parents[1]
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit: json.loads raises RecursionError
DEEP_SMALL = "[" * 2000 + "]" * 2000  # as deep, and small enough for signature.ed25519 (4 KiB)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DETOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DETOX_REGISTRY", raising=False)
    monkeypatch.delenv("DETOX_FAULT_POINT", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def reg(tmp_path) -> Path:
    return tmp_path / "registry"


def retag(src: Path, dst: Path, version: str, name: str = "team-cal", **fields) -> Path:
    """A copy of an artifact under another name/version (the manifest does not hash itself, so this stays valid)."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    raw.update(version=version, name=name, **fields)
    (dst / "manifest.json").write_text(json.dumps(raw, indent=2))
    return dst


def edit_manifest(art: Path, text: str) -> Path:
    (art / "manifest.json").write_text(text)
    return art


def one_line_error(args: list, *must_contain: str):
    """The command fails with exit status 1 and exactly one line of output, as an error (not a crash)."""
    r = cli(*args)
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), f"uncaught {type(r.exception).__name__}: {r.exception!r}"
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "Traceback" not in r.output
    for text in must_contain:
        assert text in lines[0], lines[0]
    return lines[0]


def visible(reg: Path) -> list[str]:
    return sorted(str(p.relative_to(reg)) for p in reg.glob("*/*.detox"))


def index(reg: Path) -> dict:
    return json.loads((reg / "index.json").read_text())["artifacts"]


def assert_consistent(reg: Path, expected: list[str], unused_records: list[str] = ()) -> None:
    """Exactly ``expected`` (NAME/VERSION) published, each indexed once with the sha256 of its bytes (plus at most
    ``unused_records``: records whose archive never appeared, which readers ignore and the next write drops)."""
    assert visible(reg) == [f"{e}.detox" for e in sorted(expected)]
    recorded = {f"{n}/{v}": rec["sha256"] for n, vs in index(reg).items() for v, rec in vs.items()}
    assert set(expected) <= set(recorded) <= set(expected) | set(unused_records), recorded
    for key in expected:
        assert recorded[key] == sha256_file(reg / f"{key}.detox"), key
    listing = json.loads(ok("artifacts", "list", "--registry", reg, "--json"))
    assert sorted(f"{e['name']}/{e['version']}" for e in listing) == sorted(expected)
    assert all(e["sha256"] for e in listing)


# ---------------------------------------------------------------- kill -9 at every step, then the same command


def run_detox(args: list, cache: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DETOX_FAULT_POINT"}
    env["DETOX_CACHE"] = str(cache)
    if fault:
        env["DETOX_FAULT_POINT"] = fault
    return subprocess.run([sys.executable, "-m", "detox.cli.main", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fault,visible_after_kill", [
    ("push:staged", False),      # archive packed in REG/.tmp, nothing recorded
    ("index:written", False),    # the new record is in index.json, the archive not yet visible
    ("push:published", True),    # archive linked into place, the push never reported back
    ("cache:unpacked", False),   # pushing a .detox file: killed while validating it in the cache
])
def test_a_push_killed_at_any_step_converges_when_run_again(fault, visible_after_kill, aligned_llama, reg, tmp_path, cache):
    ok("artifacts", "push", retag(aligned_llama, tmp_path / "old", "1.0.0"), "--registry", reg)
    new = pack(retag(aligned_llama, tmp_path / "new", "2.0.0"), tmp_path / "new.detox")
    before = sha256_file(reg / "team-cal" / "1.0.0.detox")

    killed = run_detox(["artifacts", "push", new, "--registry", reg], cache, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert visible(reg) == ["team-cal/1.0.0.detox"] + (["team-cal/2.0.0.detox"] if visible_after_kill else [])
    # whatever the kill left, readers are consistent at once: no unrecorded archive, no record without one
    assert_consistent(reg, ["team-cal/1.0.0"] + (["team-cal/2.0.0"] if visible_after_kill else []), ["team-cal/2.0.0"])

    again = run_detox(["artifacts", "push", new, "--registry", reg], cache)
    assert again.returncode == 0, again.stdout + again.stderr
    assert ("already in" in again.stdout) == visible_after_kill, again.stdout
    assert_consistent(reg, ["team-cal/1.0.0", "team-cal/2.0.0"])
    assert sha256_file(reg / "team-cal" / "1.0.0.detox") == before  # nothing lost
    pulled = cli("artifacts", "pull", "team-cal@2.0.0", "--registry", reg)
    assert pulled.exit_code == 0 and f"sha256 {sha256_file(new)}" in pulled.stdout, pulled.output
    assert pulled.stderr == ""


@pytest.mark.parametrize("fault", ["cache:blob", "cache:unpacked"])
def test_a_pull_killed_at_any_step_converges_when_run_again(fault, aligned_llama, reg, tmp_path, cache):
    ok("artifacts", "push", retag(aligned_llama, tmp_path / "a", "1.0.0"), "--registry", reg)
    killed = run_detox(["artifacts", "pull", "team-cal@1.0.0", "--registry", reg], cache, fault)
    assert killed.returncode == -signal.SIGKILL
    assert not list((cache / "unpacked").glob("[!.]*")), "a killed pull left a directory under a final name"
    again = run_detox(["artifacts", "pull", "team-cal@1.0.0", "--registry", reg], cache)
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip().splitlines()[-1]).is_dir()
    assert len(list((cache / "blobs" / "sha256").glob("*.detox"))) == 1


def test_a_killed_rm_leaves_a_consistent_registry(aligned_llama, reg, tmp_path, cache):
    for v in ("1.0.0", "2.0.0"):
        ok("artifacts", "push", retag(aligned_llama, tmp_path / v, v), "--registry", reg)
    killed = run_detox(["artifacts", "rm", "team-cal@1.0.0", "--registry", reg], cache, "rm:unlinked")
    assert killed.returncode == -signal.SIGKILL
    assert_consistent(reg, ["team-cal/2.0.0"], ["team-cal/1.0.0"])
    r = cli("artifacts", "pull", "team-cal@1.0.0", "--registry", reg)
    assert r.exit_code == 1 and "no version of team-cal" in r.output
    ok("artifacts", "push", retag(aligned_llama, tmp_path / "3", "3.0.0"), "--registry", reg)  # the next write drops the stale record
    assert_consistent(reg, ["team-cal/2.0.0", "team-cal/3.0.0"])


def test_unrecorded_archives_are_recorded_by_repair_and_by_the_next_push(aligned_llama, reg, tmp_path, cache):
    """An archive without a record (copied in by hand, or pushed by a detox that crashed before indexing)."""
    for v in ("1.0.0", "2.0.0"):
        ok("artifacts", "push", retag(aligned_llama, tmp_path / v, v), "--registry", reg)
    (reg / "index.json").write_text(json.dumps({"format": 1, "artifacts": {}}))
    r = CliRunner().invoke(main, ["artifacts", "pull", "team-cal@1.0.0", "--registry", str(reg)])
    assert r.exit_code == 0 and "unrecorded" in r.output and "detox artifacts repair" in r.output, r.output
    out = ok("artifacts", "repair", "--registry", reg)
    assert "recorded team-cal@1.0.0 from its archive" in out and "recorded team-cal@2.0.0" in out
    assert_consistent(reg, ["team-cal/1.0.0", "team-cal/2.0.0"])
    assert "nothing to repair" in ok("artifacts", "repair", "--registry", reg)

    (reg / "index.json").unlink()
    ok("artifacts", "push", retag(aligned_llama, tmp_path / "3", "3.0.0"), "--registry", reg)
    assert_consistent(reg, ["team-cal/1.0.0", "team-cal/2.0.0", "team-cal/3.0.0"])


def test_repushing_other_bytes_under_a_published_version_is_refused(aligned_llama, reg, tmp_path):
    art = retag(aligned_llama, tmp_path / "a", "1.0.0")
    ok("artifacts", "push", art, "--registry", reg)
    assert "already in" in ok("artifacts", "push", art, "--registry", reg)  # same bytes: converges
    other = retag(aligned_llama, tmp_path / "b", "1.0.0", description="other bytes")
    one_line_error(["artifacts", "push", other, "--registry", reg], "already exists", "immutable")
    assert_consistent(reg, ["team-cal/1.0.0"])


# ---------------------------------------------------------------- a registry nobody can poison


def test_a_version_with_a_trailing_newline_is_never_published(aligned_llama, reg, tmp_path):
    for field, value in (("version", "9.9.9\n"), ("name", "team-cal\n"), ("version", "9.9.9\n1.0.0")):
        bad = retag(aligned_llama, tmp_path / f"bad-{field}-{len(value)}", "1.0.0")
        raw = json.loads((bad / "manifest.json").read_text())
        raw[field] = value
        edit_manifest(bad, json.dumps(raw))
        one_line_error(["artifacts", "push", bad, "--registry", reg], "manifest.json", field)
    assert not reg.exists() or visible(reg) == []


def poison(reg: Path, archive: Path) -> dict[str, Path]:
    """Entries that no detox push can make, put there by hand (or by an older detox)."""
    bad = {
        "newline version": reg / "team-cal" / "9.9.9\n.detox",
        "newline name": reg / "team-cal\n" / "1.0.0.detox",
        "junk version": reg / "team-cal" / "latest.detox",
        "garbage archive": reg / "team-cal" / "3.0.0.detox",
    }
    for key, path in bad.items():
        path.parent.mkdir(exist_ok=True)
        if key == "garbage archive":
            path.write_bytes(b"not a tar archive at all" * 40)
        else:
            shutil.copy(archive, path)
    return bad


def test_list_and_pull_skip_and_report_what_they_cannot_read_and_rm_removes_it(aligned_llama, reg, tmp_path, cache):
    for v in ("1.0.0", "2.0.0"):
        ok("artifacts", "push", retag(aligned_llama, tmp_path / v, v), "--registry", reg)
    bad = poison(reg, reg / "team-cal" / "2.0.0.detox")

    listed = cli("artifacts", "list", "--registry", reg, "--json")
    assert listed.exit_code == 0, listed.output
    assert [e["version"] for e in json.loads(listed.stdout)] == ["2.0.0", "1.0.0"]
    warnings = listed.stderr.strip().splitlines()
    assert len(warnings) == len(bad) and all(w.startswith("warning: skipping") for w in warnings), listed.stderr
    # pull: the newest *readable* version in range, with the skipped one reported
    pulled = cli("artifacts", "pull", "team-cal", "--registry", reg)
    assert pulled.exit_code == 0 and "pulled team-cal@2.0.0" in pulled.stdout, pulled.output
    assert "skipping team-cal@3.0.0" in pulled.stderr
    exact = cli("artifacts", "pull", "team-cal@3.0.0", "--registry", reg)
    assert exact.exit_code == 1 and isinstance(exact.exception, SystemExit), exact.output
    assert exact.stderr.splitlines()[-1].startswith("Error: no readable version of team-cal@3.0.0")
    assert all(line.startswith("warning: skipping") for line in exact.stderr.splitlines()[:-1])

    # every warning names the command that removes the entry; run it as printed, through a shell
    detox = f"{shlex.quote(sys.executable)} -m detox.cli.main"
    for line in warnings:
        command = line.split("remove it with: ", 1)[1]
        assert command.startswith("detox artifacts rm ")
        done = subprocess.run(["bash", "-c", detox + command[len("detox"):]], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "DETOX_CACHE": str(cache)}, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert not any(p.exists() for p in bad.values())
    assert not (reg / "team-cal\n").exists()
    assert_consistent(reg, ["team-cal/1.0.0", "team-cal/2.0.0"])
    assert cli("artifacts", "list", "--registry", reg).stderr == ""


def test_python_api_warns_and_raises_artifact_errors_only(aligned_llama, reg, tmp_path):
    ok("artifacts", "push", retag(aligned_llama, tmp_path / "1", "1.0.0"), "--registry", reg)
    poison(reg, reg / "team-cal" / "1.0.0.detox")
    registry = open_registry(reg)
    with pytest.warns(UserWarning, match="skipping"):
        assert [e.version for e in registry.entries()] == ["1.0.0"]
    for bad_ref in ("team-cal@1.0.0 ||", "team-cal\n@1.0.0", "Team@1", "team-cal@junk"):
        with pytest.raises(RegistryError):
            registry.resolve(bad_ref)
    for call in (lambda: registry.entry("team-cal", "9.9.9\n"), lambda: registry.entry("../x", "1.0.0"),
                 lambda: registry.remove("team-cal", "../../x")):
        with pytest.raises(ArtifactError):
            call()


# ---------------------------------------------------------------- malformed ranges are errors, never widened


@pytest.mark.parametrize("spec", ["1.0.0 ||", "|| 1.0.0", "1.0.0 || || 2.0.0", "||", "junk", ">=", "1.0.0 - 2.0.0",
                                  "^1.0.0.0", "1.0.0 <", "=>1.0.0", "1.0.0\n2.0.0 ||"])
def test_malformed_ranges_are_errors(spec):
    with pytest.raises(RangeError):
        Range.parse(spec)


def test_a_stray_alternative_never_widens_a_pinned_pull(aligned_llama, reg, tmp_path):
    for v in ("1.0.0", "8.0.1"):
        ok("artifacts", "push", retag(aligned_llama, tmp_path / v, v), "--registry", reg)
    for ref in ("team-cal@1.0.0 ||", "team-cal@|| 1.0.0", "team-cal@1.0.0 || junk"):
        one_line_error(["artifacts", "pull", ref, "--registry", reg], repr(ref))
    assert "pulled team-cal@1.0.0" in ok("artifacts", "pull", "team-cal@1.0.0 || 0.9", "--registry", reg)


def test_versions_are_full_matches():
    for text in ("1.0.0\n", "1.0.0 ", " 1.0.0", "1.0.0-", "1.0.0-a..b", "1.0.0+", "01.0.0", "1.0.0-" + "a" * 200):
        with pytest.raises(RangeError):
            Version.parse(text)
    assert str(Version.parse("1.0.0-rc.1+build.5")) == "1.0.0-rc.1+build.5"


# ---------------------------------------------------------------- malformed index.json: a push publishes nothing


@pytest.mark.parametrize("content,problem", [
    (json.dumps({"format": 1, "artifacts": {"team-cal": ["1.0.0"]}}), "maps to a list"),
    (json.dumps({"format": 1, "artifacts": {"team-cal": {"1.0.0": {"kind": "aligned", "size": True}}}}), "malformed"),
    (json.dumps({"format": 1, "artifacts": {"team-cal": {"1.0.0": {"kind": "aligned", "size": 1, "sha256": "x"}}}}), "malformed"),
    (json.dumps({"format": 1, "artifacts": {"x\n": {}}}), "not a valid artifact name"),
    (json.dumps({"format": 1, "artifacts": {"team-cal": {"1.0.0\n": {}}}}), "not a semantic version"),
    (json.dumps({"format": 1, "artifacts": []}), "must be a JSON object"),
    (json.dumps({"format": 2, "artifacts": {}}), "index format 2"),
    ('{"format": 1, "artifacts": ' + DEEP + "}", "nested too deeply"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_a_push_with_a_malformed_index_publishes_nothing(content, problem, aligned_llama, reg, tmp_path):
    ok("artifacts", "push", retag(aligned_llama, tmp_path / "1", "1.0.0"), "--registry", reg)
    path = reg / "index.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    art = retag(aligned_llama, tmp_path / "2", "2.0.0")
    one_line_error(["artifacts", "push", art, "--registry", reg], "index.json", problem, "detox artifacts repair")
    assert visible(reg) == ["team-cal/1.0.0.detox"]  # the failed push left nothing visible
    # readers still work, with the problem reported once
    r = cli("artifacts", "list", "--registry", reg)
    assert r.exit_code == 0 and "team-cal@1.0.0" in r.stdout, r.output
    assert r.stderr.count("warning: ") == 1 and r.stderr.count("\n") == 1 and "index.json" in r.stderr, r.stderr
    ok("artifacts", "repair", "--registry", reg)
    assert "pushed team-cal@2.0.0" in ok("artifacts", "push", art, "--registry", reg)
    assert_consistent(reg, ["team-cal/1.0.0", "team-cal/2.0.0"])


# ---------------------------------------------------------------- malformed artifact files: one line, exit 1


def _manifest_rows():
    def set_field(path: list, value):
        def edit(raw):
            obj = raw
            for key in path[:-1]:
                obj = obj[key]
            obj[path[-1]] = value
            return json.dumps(raw)
        return edit

    return [
        ("not json", lambda raw: "{", "not valid JSON"),
        ("deeply nested", lambda raw: DEEP, "nested too deeply"),
        ("nested in a field", lambda raw: '{"format_version": 1, "evaluation": ' + DEEP + "}", "too deeply"),
        ("a list", lambda raw: "[]", "no integer format_version"),
        ("not utf-8", lambda raw: b"\xff" + json.dumps(raw).encode(), "not UTF-8"),
        ("format_version true", set_field(["format_version"], True), "no integer format_version"),
        ("format_version 1.0", set_field(["format_version"], 1.0), "no integer format_version"),
        ("version newline", set_field(["version"], "1.0.0\n"), "version"),
        ("name newline", set_field(["name"], "tiny\n"), "name"),
        ("num_layers 600", set_field(["calibrator", "num_layers"], 600), "num_layers"),
        ("num_layers true", set_field(["calibrator", "num_layers"], True), "num_layers"),
        ("num_layers '2'", set_field(["calibrator", "num_layers"], "2"), "num_layers"),
        ("hidden 10^9", set_field(["calibrator", "hidden_size"], 10**9), "hidden_size"),
        ("vocab 10^9", set_field(["calibrator", "vocab_size"], 10**9), "vocab_size"),
        ("heads 10^6", set_field(["calibrator", "num_heads"], 10**6), "num_heads"),
        ("ffn 10^9", set_field(["calibrator", "ffn_size"], 10**9), "ffn_size"),
        ("positions 10^9", set_field(["calibrator", "max_positions"], 10**9), "max_positions"),
        ("bos 10^6", set_field(["calibrator", "bos_token_id"], 10**6), "bos_token_id"),
        ("eos -1", set_field(["calibrator", "eos_token_id"], -1), "eos_token_id"),
        ("norm_eps 0", set_field(["calibrator", "norm_eps"], 0), "norm_eps"),
        ("target vocab 10^12", set_field(["alignment", "target", "vocab_size"], 10**12), "vocab_size"),
        ("layers fit no tensor", set_field(["calibrator", "num_layers"], 3), "does not match the manifest's calibrator architecture"),
        ("ffn fits no tensor", set_field(["calibrator", "ffn_size"], 128), "does not match the manifest's calibrator architecture"),
        ("negative file size", set_field(["files", "tokenizer.json", "size"], -1), "size"),
    ]


@pytest.mark.parametrize("row", _manifest_rows(), ids=lambda r: r[0])
def test_malformed_manifest_one_line_error(row, aligned_llama, tmp_path, cache):
    _, edit, problem = row
    art = shutil.copytree(aligned_llama, tmp_path / "art")
    text = edit(json.loads((art / "manifest.json").read_text()))
    (art / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line_error(["artifacts", "verify", art], "manifest.json" if "tensor" not in row[0] else "safetensors", problem)
    with pytest.raises(ArtifactError):  # the Python API raises ArtifactError, nothing else
        load_artifact(art)
    one_line_error(["artifacts", "push", art, "--registry", tmp_path / "reg"], problem)
    assert not (tmp_path / "reg").exists() or visible(tmp_path / "reg") == []


def test_an_oversized_architecture_is_refused_before_anything_is_allocated(aligned_llama, tmp_path):
    """Within every bound, but the weights are tiny: building it would allocate ~50 GB. Refused from the headers."""
    from detox.runtime import Calibrator

    art = shutil.copytree(aligned_llama, tmp_path / "art")
    raw = json.loads((art / "manifest.json").read_text())
    raw["calibrator"].update(num_layers=64, hidden_size=8192, num_heads=64, ffn_size=32768)
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="does not match the manifest's calibrator architecture"):
        Calibrator.load(art)


def test_a_calibrator_built_in_memory_is_checked_before_its_model_is_allocated(aligned_llama):
    from detox.runtime import Calibrator

    artifact = load_artifact(aligned_llama)
    huge = artifact.manifest.calibrator.model_copy(update=dict(num_layers=64, hidden_size=8192, num_heads=64, ffn_size=32768))
    artifact.manifest = artifact.manifest.model_copy(update={"calibrator": huge})
    with pytest.raises(ArtifactError, match="does not match the manifest's calibrator architecture"):
        Calibrator(artifact).torch_model()


@pytest.mark.parametrize("bad_id", [10**6, -2])
def test_token_map_ids_outside_the_calibrator_vocabulary_are_refused_at_load(bad_id, contrast_llama, tmp_path):
    """A contrast artifact's token map indexes the calibrator's embeddings at generation time: checked at load."""
    from safetensors.numpy import load_file, save_file

    art = shutil.copytree(contrast_llama, tmp_path / "art")
    arrays = load_file(str(art / "alignment.safetensors"))
    arrays["token_map"][3] = bad_id
    save_file(arrays, str(art / "alignment.safetensors"))
    raw = json.loads((art / "manifest.json").read_text())  # the attacker rewrites the manifest's hash too
    raw["files"]["alignment.safetensors"] = {"sha256": sha256_file(art / "alignment.safetensors"),
                                             "size": (art / "alignment.safetensors").stat().st_size}
    (art / "manifest.json").write_text(json.dumps(raw))
    one_line_error(["artifacts", "verify", art], "alignment.safetensors", "token_map holds ids outside")


def test_calibrator_config_state_shapes_match_the_torch_model():
    import torch

    from detox.calibrator import CalibratorLM
    from detox.config import CalibratorConfig

    cfg = CalibratorConfig(vocab_size=64, hidden_size=16, num_layers=3, num_heads=2, ffn_size=24)
    model = CalibratorLM(cfg)
    assert cfg.state_shapes() == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())


SIG_ROWS = [
    ("deeply nested", DEEP_SMALL, "nested too deeply"),
    ("not json", "{", "not valid JSON"),
    ("a list", "[]", "malformed"),
    ("key_id true", json.dumps({"algorithm": "ed25519", "key_id": True, "manifest_sha256": "0" * 64, "signature": ""}), "key_id"),
    ("key_id newline", json.dumps({"algorithm": "ed25519", "key_id": "0" * 64 + "\n", "manifest_sha256": "0" * 64,
                                   "signature": ""}), "key_id"),
]


@pytest.mark.parametrize("row", SIG_ROWS, ids=lambda r: r[0])
def test_malformed_signature_one_line_error(row, aligned_llama, tmp_path, cache):
    from detox.artifacts.signing import SignatureError, verify_signature

    _, content, problem = row
    art = shutil.copytree(aligned_llama, tmp_path / "art")
    ok("artifacts", "keygen", "--out", tmp_path / "key")
    ok("artifacts", "sign", art, "--key", tmp_path / "key")
    (art / "signature.ed25519").write_text(content)
    one_line_error(["artifacts", "verify", art, "--key", tmp_path / "key.pub"], "signature.ed25519", problem)
    with pytest.raises(SignatureError):
        verify_signature(art, tmp_path / "key.pub")
    # listings read the signer from the archive: a malformed signature shows as such, never a crash
    reg = tmp_path / "reg"
    one_line_error(["artifacts", "push", art, "--registry", reg, "--require-signature", tmp_path / "key.pub"],
                   "signature.ed25519")
    assert not reg.exists() or visible(reg) == []


def _with_size(good: bytes, field: bytes) -> bytes:
    """``good`` with its first member's size field replaced (and the header checksum made valid again)."""
    header = bytearray(good[:512])
    header[124:136] = field.ljust(12, b"\x00")[:12]
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header) + good[512:]


def _deep_manifest(good: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(DEEP_SMALL)
        tar.addfile(info, io.BytesIO(DEEP_SMALL.encode()))
    return buf.getvalue()


ARCHIVE_ROWS = [
    ("negative size", lambda good: _with_size(good, b"-0000001"), "not an octal number"),
    ("plus size", lambda good: _with_size(good, b"+0001000"), "not an octal number"),
    ("underscore size", lambda good: _with_size(good, b"0_0001000"), "not an octal number"),
    ("hex size", lambda good: _with_size(good, b"0x100"), "not an octal number"),
    ("truncated", lambda good: good[: len(good) // 2], "truncated"),
    ("not a tar", lambda good: b"hello" * 300, "corrupt tar header"),
    ("empty", lambda good: b"", "truncated"),
    ("gzip", lambda good: b"\x1f\x8b" + good[2:], "compressed"),
    ("deeply nested manifest", _deep_manifest, "nested too deeply"),
    ("data after the end", lambda good: good + b"x" * 10, "after its end-of-archive marker"),
]


@pytest.mark.parametrize("row", ARCHIVE_ROWS, ids=lambda r: r[0])
def test_malformed_archive_one_line_error(row, aligned_llama, tmp_path, cache):
    _, make, problem = row
    bad = tmp_path / "bad.detox"
    bad.write_bytes(make(pack(aligned_llama, tmp_path / "good.detox").read_bytes()))
    one_line_error(["artifacts", "unpack", bad, "--out", tmp_path / "out"], str(bad), problem)
    assert not (tmp_path / "out").exists()
    one_line_error(["artifacts", "show", bad], str(bad))
    one_line_error(["artifacts", "push", bad, "--registry", tmp_path / "reg"], str(bad))
    assert not (tmp_path / "reg").exists() or visible(tmp_path / "reg") == []
    with pytest.raises(ArtifactError):
        load_artifact(bad)
    unpacked = cache / "unpacked"
    assert not unpacked.exists() or not [p for p in unpacked.iterdir() if not p.name.startswith(".")]
