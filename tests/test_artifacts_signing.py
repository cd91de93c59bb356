"""Ed25519 signing: keygen, sign, verify (CLI and API), `detox.wrap(require_signature=...)`, and target binding."""

from __future__ import annotations

import base64
import json
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from detox.artifacts.archive import pack
from detox.artifacts.signing import SignatureError, generate_keypair, load_verified, verify_signature
from detox.artifacts.store import ArtifactError
from detox.cli.main import main


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DETOX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(d / "team.key")
    other_priv, other_pub = generate_keypair(d / "other.key")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


@pytest.fixture
def art(tmp_path, aligned_llama) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(aligned_llama, dst)
    return dst


@pytest.fixture
def signed(art, keys) -> Path:
    r = cli("artifacts", "sign", art, "--key", keys["priv"])
    assert r.exit_code == 0, r.output
    return art


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(args: list, match: str) -> None:
    r = cli(*args)
    assert r.exit_code != 0, r.output
    assert match in r.output, r.output
    assert "Traceback" not in r.output


def test_keygen_writes_a_private_and_a_public_pem_and_never_overwrites(tmp_path):
    r = cli("artifacts", "keygen", "--out", tmp_path / "k")
    assert r.exit_code == 0, r.output
    priv, pub = tmp_path / "k", tmp_path / "k.pub"
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    before = priv.read_bytes()
    refused(["artifacts", "keygen", "--out", priv], "already exists")
    assert priv.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]  # no temp files left behind


def test_sign_and_verify_directory_and_archive(signed, keys, tmp_path):
    assert (signed / "signature.ed25519").is_file()
    r = cli("artifacts", "verify", signed, "--key", keys["pub"])
    assert r.exit_code == 0 and "signature: valid" in r.output, r.output
    # the signature travels inside the archive, and archives can be signed directly too
    archive = pack(signed, tmp_path / "signed.detox")
    assert cli("artifacts", "verify", archive, "--key", keys["pub"]).exit_code == 0
    unsigned = pack(signed, tmp_path / "resign.detox")
    r = cli("artifacts", "sign", unsigned, "--key", keys["other_priv"])
    assert r.exit_code == 0, r.output
    assert cli("artifacts", "verify", unsigned, "--key", keys["other_pub"]).exit_code == 0
    refused(["artifacts", "verify", unsigned, "--key", keys["pub"]], "not by a trusted key")
    # several trusted keys (key rotation): any of them will do
    assert cli("artifacts", "verify", unsigned, "--key", keys["pub"], "--key", keys["other_pub"]).exit_code == 0
    assert not list(tmp_path.glob(".*")), "signing an archive left temporary files"


def test_unsigned_is_refused(art, keys):
    refused(["artifacts", "verify", art, "--key", keys["pub"]], "is not signed")
    with pytest.raises(SignatureError, match="is not signed"):
        load_verified(art, keys["pub"])


def test_wrongly_signed_is_refused(art, keys):
    assert cli("artifacts", "sign", art, "--key", keys["other_priv"]).exit_code == 0
    refused(["artifacts", "verify", art, "--key", keys["pub"]], "not by a trusted key")


def test_manifest_edited_after_signing(signed, keys, tmp_path):
    mpath = signed / "manifest.json"
    raw = json.loads(mpath.read_text())
    raw["alignment"]["default_strength"] = 1.0  # a "harmless" edit that still changes behaviour
    mpath.write_text(json.dumps(raw, indent=2))
    refused(["artifacts", "verify", signed, "--key", keys["pub"]], "manifest.json was changed after it was signed")
    # an attacker who also rewrites the signature file's informative hash still fails the cryptographic check
    spath = signed / "signature.ed25519"
    sig = json.loads(spath.read_text())
    import hashlib

    sig["manifest_sha256"] = hashlib.sha256(mpath.read_bytes()).hexdigest()
    spath.write_text(json.dumps(sig))
    refused(["artifacts", "verify", signed, "--key", keys["pub"]], "does not verify")
    archive = pack(signed, tmp_path / "edited.detox")  # hashes still match, so it packs; the signature check refuses it
    refused(["artifacts", "verify", archive, "--key", keys["pub"]], "does not verify")


def test_forged_signature_bytes(signed, keys):
    spath = signed / "signature.ed25519"
    sig = json.loads(spath.read_text())
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[0] ^= 1
    sig["signature"] = base64.b64encode(bytes(raw)).decode()
    spath.write_text(json.dumps(sig))
    refused(["artifacts", "verify", signed, "--key", keys["pub"]], "does not verify")
    spath.write_text("not json")
    refused(["artifacts", "verify", signed, "--key", keys["pub"]], "signature.ed25519 is malformed")


def test_flipped_weight_after_signing(signed, keys):
    p = signed / "alignment.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x10
    p.write_bytes(bytes(data))
    refused(["artifacts", "verify", signed, "--key", keys["pub"]], "alignment.safetensors does not match its sha256")


def test_signature_must_be_a_regular_file(signed, keys, tmp_path):
    spath = signed / "signature.ed25519"
    real = tmp_path / "elsewhere.sig"
    shutil.move(spath, real)
    spath.symlink_to(real)
    refused(["artifacts", "verify", signed, "--key", keys["pub"]], "not a regular file")
    refused(["artifacts", "verify", signed], "not a regular file")  # even when no signature is required


def test_key_mixups_get_clear_errors(signed, keys):
    refused(["artifacts", "verify", signed, "--key", keys["priv"]], "is a private key")
    refused(["artifacts", "sign", signed, "--key", keys["pub"]], "is a public key")


def test_cannot_sign_a_tampered_artifact(art, keys):
    (art / "tokenizer.json").write_text("{}")
    refused(["artifacts", "sign", art, "--key", keys["priv"]], "tokenizer.json does not match its sha256")
    assert not (art / "signature.ed25519").exists()


# ---------------------------------------------------------------- the SDK: detox.wrap


@pytest.fixture(scope="module")
def llama(llama_target_dir):
    from detox.targets import load_hf_target

    return load_hf_target(str(llama_target_dir))


def test_wrap_require_signature(signed, art, keys, llama, tmp_path):
    import detox

    model, tok = llama
    wrapped = detox.wrap(model, calibrator=str(signed), tokenizer=tok, require_signature=keys["pub"])
    assert wrapped is not None
    pem_text = keys["pub"].read_text()  # keys may be given as PEM text too
    detox.wrap(model, calibrator=pack(signed, tmp_path / "s.detox"), tokenizer=tok, require_signature=pem_text)
    with pytest.raises(SignatureError, match="not by a trusted key"):
        detox.wrap(model, calibrator=str(signed), tokenizer=tok, require_signature=keys["other_pub"])
    unsigned = tmp_path / "unsigned"
    shutil.copytree(signed, unsigned)
    (unsigned / "signature.ed25519").unlink()
    with pytest.raises(SignatureError, match="is not signed"):
        detox.wrap(model, calibrator=str(unsigned), tokenizer=tok, require_signature=keys["pub"])
    # a Calibrator loaded earlier without checks is re-checked from its files
    with pytest.raises(SignatureError, match="is not signed"):
        detox.wrap(model, calibrator=detox.Calibrator.load(unsigned), tokenizer=tok, require_signature=keys["pub"])


def test_artifact_aligned_to_another_target(aligned_llama, gpt2_target_dir, llama_target_dir):
    import detox
    from detox.runtime import TargetMismatchError
    from detox.targets import load_hf_target

    gpt2, gpt2_tok = load_hf_target(str(gpt2_target_dir))
    with pytest.raises(TargetMismatchError, match="does not match this model"):
        detox.wrap(gpt2, calibrator=str(aligned_llama), tokenizer=gpt2_tok)
    refused(["artifacts", "verify", aligned_llama, "--target", gpt2_target_dir], "does not match this model")
    r = cli("artifacts", "verify", aligned_llama, "--target", llama_target_dir)
    assert r.exit_code == 0 and "target: aligned" in r.output, r.output


def test_verify_signature_api_returns_the_signed_manifest(signed, keys):
    m = verify_signature(signed, [keys["other_pub"], keys["pub"]])
    assert m.name == "tiny-cal"
    with pytest.raises(ArtifactError, match="no trusted public key"):
        verify_signature(signed, [])
