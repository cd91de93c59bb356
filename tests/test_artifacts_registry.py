"""Registries: a real directory registry (including concurrent and killed pushes in real processes), and the
Hugging Face Hub registry against a small in-memory fake of the two HfApi calls it makes."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from detox.artifacts.cache import blob_path
from detox.artifacts.registry import HubRegistry, RegistryError, open_registry
from detox.data import sha256_file
from detox.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DETOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DETOX_REGISTRY", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def reg(tmp_path) -> Path:
    return tmp_path / "registry"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args) -> str:
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return r.output


def refused(args: list, match: str) -> None:
    r = cli(*args)
    assert r.exit_code != 0, r.output
    assert match in r.output, r.output
    assert "Traceback" not in r.output


def retag(src: Path, dst: Path, version: str, name: str | None = None) -> Path:
    """A copy of an artifact under another version (the manifest does not hash itself, so this stays valid)."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    raw["version"] = version
    raw["name"] = name or raw["name"]
    (dst / "manifest.json").write_text(json.dumps(raw, indent=2))
    return dst


def visible(reg: Path) -> list[str]:
    """Everything a user of the registry can see: published archives."""
    return sorted(str(p.relative_to(reg)) for p in reg.glob("*/*.detox"))


# ---------------------------------------------------------------- the directory registry, end to end


def test_push_list_show_pull_verify_rm(aligned_llama, aligned_gpt2, reg, tmp_path, cache):
    a = retag(aligned_llama, tmp_path / "a", "1.2.0", "team-cal")
    b = retag(aligned_llama, tmp_path / "b", "1.3.1", "team-cal")
    c = retag(aligned_gpt2, tmp_path / "c", "2.0.0", "team-cal")
    for art in (a, b, c):
        assert "pushed team-cal@" in ok("artifacts", "push", art, "--registry", reg)
    assert visible(reg) == ["team-cal/1.2.0.detox", "team-cal/1.3.1.detox", "team-cal/2.0.0.detox"]
    umask = os.umask(0)
    os.umask(umask)
    modes = {(reg / v).stat().st_mode & 0o777 for v in visible(reg)}
    assert modes == {0o644 & ~umask}, f"archives must be as readable as the umask allows (not owner-only): {modes}"
    index = json.loads((reg / "index.json").read_text())
    assert set(index["artifacts"]["team-cal"]) == {"1.2.0", "1.3.1", "2.0.0"}

    listing = ok("artifacts", "list", "--registry", reg)
    assert listing.index("team-cal@2.0.0") < listing.index("team-cal@1.3.1") < listing.index("team-cal@1.2.0")
    rows = json.loads(ok("artifacts", "list", "team-cal", "--registry", f"file://{reg}", "--json"))
    assert [r["version"] for r in rows] == ["2.0.0", "1.3.1", "1.2.0"] and all(r["sha256"] for r in rows)
    shown = json.loads(ok("artifacts", "show", "team-cal@~1.2", "--registry", reg))
    assert shown["manifest"]["version"] == "1.2.0"

    out = ok("artifacts", "pull", "team-cal@^1.2", "--registry", reg)
    assert "team-cal@1.3.1" in out
    cached = Path(out.strip().splitlines()[-1])
    assert cached.parent == cache / "unpacked" and (cached / "manifest.json").is_file()
    # content-addressed: the blob is named by the archive's sha256, and pulling again reuses it
    blob = blob_path(rows[1]["sha256"])
    assert blob.is_file() and sha256_file(blob) == rows[1]["sha256"] == cached.name
    ok("artifacts", "pull", "team-cal@1.3.1", "--registry", reg)
    assert len(list((cache / "blobs" / "sha256").glob("*.detox"))) == 1

    ok("artifacts", "pull", "team-cal@>=2", "--registry", reg, "--out", tmp_path / "got.detox")
    ok("artifacts", "pull", "team-cal@2.0.0", "--registry", reg, "--out", tmp_path / "got-dir")
    assert sha256_file(tmp_path / "got.detox") == rows[0]["sha256"]
    assert json.loads((tmp_path / "got-dir" / "manifest.json").read_text())["version"] == "2.0.0"
    assert "OK team-cal@1.3.1" in ok("artifacts", "verify", "team-cal@~1.3", "--registry", reg)

    refused(["artifacts", "pull", "team-cal@^3", "--registry", reg], "no version of team-cal")
    refused(["artifacts", "pull", "nobody@1.0.0", "--registry", reg], "not in registry")
    refused(["artifacts", "rm", "team-cal@^1", "--registry", reg], "exact NAME@X.Y.Z")
    ok("artifacts", "rm", "team-cal@1.2.0", "--registry", reg)
    refused(["artifacts", "rm", "team-cal@1.2.0", "--registry", reg], "is not in")
    assert visible(reg) == ["team-cal/1.3.1.detox", "team-cal/2.0.0.detox"]
    assert "1.2.0" not in json.loads((reg / "index.json").read_text())["artifacts"]["team-cal"]


def test_push_refuses_what_it_must_not_publish(aligned_llama, reg, tmp_path):
    art = retag(aligned_llama, tmp_path / "a", "1.0.0")
    ok("artifacts", "push", art, "--registry", reg)
    assert "identical contents" in ok("artifacts", "push", art, "--registry", reg)  # a retry converges
    other = retag(aligned_llama, tmp_path / "a2", "1.0.0")
    (other / "manifest.json").write_text((other / "manifest.json").read_text().replace('"description": "', '"description": "x', 1))
    refused(["artifacts", "push", other, "--registry", reg], "already exists")  # other bytes: versions are immutable
    broken = retag(aligned_llama, tmp_path / "b", "1.0.1")
    (broken / "alignment.safetensors").write_bytes(b"x")
    refused(["artifacts", "push", broken, "--registry", reg], "alignment.safetensors")
    key = tmp_path / "k"
    ok("artifacts", "keygen", "--out", key)
    good = retag(aligned_llama, tmp_path / "c", "1.0.2")
    refused(["artifacts", "push", good, "--registry", reg, "--require-signature", f"{key}.pub"], "is not signed")
    ok("artifacts", "sign", good, "--key", key)
    ok("artifacts", "push", good, "--registry", reg, "--require-signature", f"{key}.pub")
    assert visible(reg) == ["tiny-cal/1.0.0.detox", "tiny-cal/1.0.2.detox"]
    listing = ok("artifacts", "list", "--registry", reg)
    assert "signed:" in listing and "unsigned" in listing
    refused(["artifacts", "pull", "tiny-cal@1.0.0", "--registry", reg, "--key", f"{key}.pub"], "is not signed")
    ok("artifacts", "pull", "tiny-cal@1.0.2", "--registry", reg, "--key", f"{key}.pub")
    refused(["artifacts", "list", "--registry", "s3://bucket"], "unsupported registry")


def test_tampered_registry_file_is_refused_on_pull(aligned_llama, reg, tmp_path, cache):
    ok("artifacts", "push", retag(aligned_llama, tmp_path / "a", "1.0.0"), "--registry", reg)
    p = reg / "tiny-cal" / "1.0.0.detox"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    refused(["artifacts", "pull", "tiny-cal@1.0.0", "--registry", reg], "differs from the registry's record")
    assert not (cache / "unpacked").exists() or not list((cache / "unpacked").iterdir())
    # an archive filed under the wrong name/version is refused too
    shutil.copy(reg / "tiny-cal" / "1.0.0.detox", tmp_path / "keep")
    ok("artifacts", "rm", "tiny-cal@1.0.0", "--registry", reg)
    ok("artifacts", "push", retag(aligned_llama, tmp_path / "b", "1.0.0"), "--registry", reg)
    os.rename(reg / "tiny-cal" / "1.0.0.detox", reg / "tiny-cal" / "9.0.0.detox")
    refused(["artifacts", "pull", "tiny-cal@9.0.0", "--registry", reg], "registry is inconsistent")


def test_wrap_resolves_name_and_range_to_the_version_aligned_to_the_model(
        aligned_llama, aligned_gpt2, llama_target_dir, gpt2_target_dir, reg, tmp_path, monkeypatch):
    import detox
    from detox.targets import load_hf_target

    # newest versions are aligned to gpt2; the newest aligned to llama in ^1.2 is 1.4.0
    for version, src in [("1.2.0", aligned_llama), ("1.4.0", aligned_llama), ("1.5.0", aligned_gpt2),
                         ("2.0.0", aligned_llama)]:
        ok("artifacts", "push", retag(src, tmp_path / version, version, "team-cal"), "--registry", reg)
    monkeypatch.setenv("DETOX_REGISTRY", str(reg))
    model, tok = load_hf_target(str(llama_target_dir))
    wrapped = detox.wrap(model, calibrator="team-cal@^1.2", tokenizer=tok)
    assert wrapped.calibrator.manifest.version == "1.4.0"
    assert detox.wrap(model, calibrator="team-cal@~1.2", tokenizer=tok).calibrator.manifest.version == "1.2.0"
    gpt2, gpt2_tok = load_hf_target(str(gpt2_target_dir))
    assert detox.wrap(gpt2, calibrator="team-cal@^1", tokenizer=gpt2_tok).calibrator.manifest.version == "1.5.0"
    with pytest.raises(RegistryError, match="is aligned to this model") as err:
        detox.wrap(gpt2, calibrator="team-cal@~1.4", tokenizer=gpt2_tok)
    assert "1.4.0 (aligned to" in str(err.value)
    ok("artifacts", "pull", "team-cal@^1", "--registry", reg, "--target", llama_target_dir)


# ---------------------------------------------------------------- concurrency and crashes, in real processes


def _push_at_once(registry: str, art: str, cache: str, barrier, results) -> None:
    """Child process: push, but wait for the other pusher right before the publish step (which takes the lock)."""
    os.environ["DETOX_CACHE"] = cache
    from click.testing import CliRunner

    from detox.artifacts.registry import DirectoryRegistry
    from detox.cli.main import main

    original = DirectoryRegistry.publish

    def in_lockstep(*args):
        barrier.wait(timeout=120)
        return original(*args)

    DirectoryRegistry.publish = in_lockstep
    r = CliRunner().invoke(main, ["artifacts", "push", art, "--registry", registry])
    results.put((r.exit_code, r.output))


def test_two_processes_pushing_the_same_version_at_once(aligned_llama, aligned_gpt2, reg, tmp_path, cache):
    a = retag(aligned_llama, tmp_path / "a", "3.0.0", "race")
    b = retag(aligned_gpt2, tmp_path / "b", "3.0.0", "race")  # different bytes, same name and version
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_push_at_once, args=(str(reg), str(art), str(cache), barrier, results)) for art in (a, b)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    codes = sorted(code for code, _ in outcomes)
    assert codes[0] == 0 and codes[1] != 0, outcomes
    loser = next(out for code, out in outcomes if code != 0)
    assert "race@3.0.0 already exists" in loser and "immutable" in loser
    assert visible(reg) == ["race/3.0.0.detox"]
    winner_sha = json.loads((reg / "index.json").read_text())["artifacts"]["race"]["3.0.0"]["sha256"]
    assert sha256_file(reg / "race" / "3.0.0.detox") == winner_sha  # the index describes the archive that won
    assert list((reg / ".tmp").iterdir()) == [], "the losing push left its staged archive behind"
    ok("artifacts", "verify", "race@3.0.0", "--registry", reg)


_KILLED_PUSH = """
import os, sys, time
from detox.artifacts import registry
def stall(*args):
    open(os.environ["READY_FILE"], "w").close()   # archive fully written, not yet published
    time.sleep(120)
registry._link_exclusive = stall
from detox.cli.main import main
main(["artifacts", "push", sys.argv[1], "--registry", sys.argv[2]])
"""


def test_a_killed_push_leaves_nothing_visible(aligned_llama, reg, tmp_path, cache):
    art = retag(aligned_llama, tmp_path / "a", "1.0.0", "killed")
    ready = tmp_path / "ready"
    env = {**os.environ, "READY_FILE": str(ready), "DETOX_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PUSH, str(art), str(reg)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "the push never reached its publish step"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert visible(reg) == []
    assert "no artifacts" in ok("artifacts", "list", "--registry", reg)
    refused(["artifacts", "pull", "killed@1.0.0", "--registry", reg], "not in registry")
    assert list((reg / ".tmp").iterdir()), "the partial archive should be parked in .tmp (cleaned up later)"
    ok("artifacts", "push", art, "--registry", reg)  # no stale lock: the same version can be pushed again
    assert visible(reg) == ["killed/1.0.0.detox"]


# ---------------------------------------------------------------- Hugging Face Hub (fake)


class FakeHub:
    """TEST DOUBLE, not the Hub: an in-memory stand-in for the four HfApi methods HubRegistry calls
    (repo_info, create_repo, create_commit with parent_commit, hf_hub_download). No network is used."""

    def __init__(self, root: Path) -> None:
        self.root, self.files, self.head, self.commits = root, None, None, 0

    def repo_info(self, repo_id, revision=None, repo_type=None):
        from huggingface_hub.errors import RepositoryNotFoundError

        if self.files is None:
            raise RepositoryNotFoundError(f"{repo_id} not found")
        return SimpleNamespace(sha=self.head)

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        if self.files is None:
            self.files, self.head = {}, "0" * 40

    def create_commit(self, repo_id, operations, commit_message, repo_type=None, revision=None, parent_commit=None):
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.errors import HfHubHTTPError

        if parent_commit is not None and parent_commit != self.head:
            raise HfHubHTTPError("412 Precondition Failed", response=SimpleNamespace(status_code=412, headers={}, request=None))
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                src = op.path_or_fileobj
                self.files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
            else:
                del self.files[op.path_in_repo]
        self.commits += 1
        self.head = f"{self.commits:040x}"

    def hf_hub_download(self, repo_id, filename, revision=None, repo_type=None, cache_dir=None):
        from huggingface_hub.errors import EntryNotFoundError

        if filename not in (self.files or {}):
            raise EntryNotFoundError(f"{filename} not found")
        out = self.root / f"{self.commits}-{filename.replace('/', '_')}"
        out.write_bytes(self.files[filename])
        return str(out)


def test_hub_registry_against_a_fake(aligned_llama, llama_target_dir, tmp_path, monkeypatch):
    fake = FakeHub(tmp_path)
    monkeypatch.setattr("detox.artifacts.registry._default_hub_api", lambda: fake)
    assert isinstance(open_registry("hf://acme/calibrators"), HubRegistry)
    for version in ("1.0.0", "1.1.0"):
        ok("artifacts", "push", retag(aligned_llama, tmp_path / version, version, "team-cal"), "--registry", "hf://acme/calibrators")
    assert set(fake.files) == {"index.json", "team-cal/1.0.0.detox", "team-cal/1.1.0.detox"}
    assert "team-cal@1.1.0" in ok("artifacts", "list", "--registry", "hf://acme/calibrators")
    out = ok("artifacts", "pull", "team-cal@~1.0", "--registry", "hf://acme/calibrators")
    assert "team-cal@1.0.0" in out
    assert "identical contents" in ok("artifacts", "push", tmp_path / "1.0.0", "--registry", "hf://acme/calibrators")
    other = retag(aligned_llama, tmp_path / "other", "1.0.0", "team-cal")
    (other / "manifest.json").write_text((other / "manifest.json").read_text().replace('"description": "', '"description": "x', 1))
    refused(["artifacts", "push", other, "--registry", "hf://acme/calibrators"], "already exists")

    # another push lands between our read of the repo and our commit: ours must fail, not overwrite
    original = fake.create_commit

    def someone_else_first(*args, **kwargs):
        fake.create_commit = original
        original("acme/calibrators", [], commit_message="someone else's push")
        return original(*args, **kwargs)

    fake.create_commit = someone_else_first
    refused(["artifacts", "push", retag(aligned_llama, tmp_path / "2.0.0", "2.0.0", "team-cal"),
             "--registry", "hf://acme/calibrators"], "changed while")
    assert "team-cal/2.0.0.detox" not in fake.files

    ok("artifacts", "rm", "team-cal@1.0.0", "--registry", "hf://acme/calibrators")
    assert "team-cal/1.0.0.detox" not in fake.files
    monkeypatch.setenv("DETOX_REGISTRY", "hf://acme/calibrators")
    import detox
    from detox.targets import load_hf_target

    model, tok = load_hf_target(str(llama_target_dir))
    assert detox.wrap(model, calibrator="team-cal@^1", tokenizer=tok).calibrator.manifest.version == "1.1.0"
