"""Edge outputs measured in llama.cpp: SmolLM2-135M dense and MLP-width variants, converted with llama.cpp's own
converter, quantized Q4_K_M and Q8_0, then GGUF size, llama-perplexity and llama-bench prompt/generation speed,
beside streamprune's own (transformers) perplexity.

llama.cpp comes from the `llama-cpp-python` source distribution on PyPI (all of it is under `vendor/llama.cpp`),
downloaded and built once with cmake into ~/.cache/streamprune/llamacpp (llama-quantize, llama-perplexity,
llama-bench; a few minutes on 2 cores). Calibration as benchmarks/edge.py: 16 x 256 tokens of WikiText-2 *valid*
(seed 0). Perplexity: llama-perplexity on WikiText-2 *test*, -c 512, the first 20 chunks (llama.cpp scores the
second half of each chunk), and streamprune.evaluate on the first 20 windows of 512 tokens of the same file
(every token after the first): the two columns are not the same protocol. Speed: llama-bench pp128 and tg64,
2 threads, 3 repetitions (its mean). Run it alone on the machine:

    python benchmarks/llamacpp.py           # writes benchmarks/results/llamacpp.json and prints the table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
CACHE = Path(os.environ.get("STREAMPRUNE_CACHE", Path.home() / ".cache" / "streamprune")) / "llamacpp"
SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-bench")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# name -> prune options (None: the dense model)
MODELS = {
    "dense": None,
    "width 20% (default --width-multiple 256)": ["--structure", "width", "--sparsity", "0.2"],
    "width 40% (default --width-multiple 256)": ["--structure", "width", "--sparsity", "0.4"],
    "width 20%, --width-multiple 8": ["--structure", "width", "--sparsity", "0.2", "--width-multiple", "8"],
}
QUANTS = ("Q8_0", "Q4_K_M")


def llama_cpp() -> tuple[Path, Path]:
    """(source directory, bin directory) of llama.cpp, downloaded and built once."""
    src = next(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d",
                        str(CACHE)], check=True)
        tar = next(CACHE.glob("llama_cpp_python-*.tar.gz"))
        subprocess.run(["tar", "xzf", str(tar), "-C", str(CACHE)], check=True)
        src = next(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    bins = src / "build" / "bin"
    if not all((bins / t).is_file() for t in TOOLS):
        subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], cwd=src, check=True)
        subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), "--target", *TOOLS], cwd=src,
                       check=True)
    return src, bins


def run(cmd, **kw) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res.stdout + res.stderr


def gguf_variants(src: Path, bins: Path, model: Path, work: Path, stem: str) -> dict:
    """F16 GGUF by llama.cpp's converter, then each quant; {quant: (path, tensors llama-quantize left in F16 for
    their shape, tensors it stored in another fallback type)}."""
    f16 = work / f"{stem}-f16.gguf"
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    run([sys.executable, src / "convert_hf_to_gguf.py", model, "--outfile", f16, "--outtype", "f16"], env=env)
    out = {}
    for q in QUANTS:
        path = work / f"{stem}-{q}.gguf"
        log = run([bins / "llama-quantize", f16, path, q, "2"])
        f16 = log.count("must use F16 due to unusual shape")  # llama-quant.cpp's own words
        other = len(re.findall(r"-> falling back to", log)) - f16
        out[q] = (path, f16, other)
    f16.unlink()
    return out


def llama_ppl(bins: Path, gguf: Path) -> float:
    log = run([bins / "llama-perplexity", "-m", gguf, "-f", WIKITEXT / "test.txt", "-c", "512", "--chunks", "20",
               "-t", "2"])
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))


def llama_speed(bins: Path, gguf: Path) -> dict:
    """llama-bench's mean tokens/s: prompt processing of 128 tokens, generation of 64."""
    res = subprocess.run([str(bins / "llama-bench"), "-m", str(gguf), "-p", "128", "-n", "64", "-t", "2", "-r", "3",
                          "-o", "json"], capture_output=True, text=True, check=True)
    return {("pp128" if r["n_prompt"] else "tg64"): r["avg_ts"] for r in json.loads(res.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "llamacpp.json")
    args = ap.parse_args()

    from edge import shard_stats

    from streamprune.calibration import calibration_windows
    from streamprune.demo import build_smollm2
    from streamprune.evaluation import evaluate

    src, bins = llama_cpp()
    model = build_smollm2()
    work = Path(tempfile.mkdtemp(prefix="streamprune-llamacpp-"))
    cfg = json.loads((model / "config.json").read_text())
    calib = calibration_windows(str(WIKITEXT / "valid.txt"), model, 16, 256, 0, cfg["vocab_size"])
    calib_file = work / "calib.jsonl"
    calib_file.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in calib.tolist()))

    results = {}
    for k, (name, opts) in enumerate(MODELS.items()):
        d, entry = model, {}
        if opts is not None:
            d = work / f"m{k}"
            res = subprocess.run([sys.executable, "-m", "streamprune", "prune", str(model), str(d), "--calib",
                                  str(calib_file), "--nsamples", "16", "--seqlen", "256", "--json", "--no-progress",
                                  *opts], capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"{name}: {res.stderr}")
            s = json.loads(res.stdout)
            entry["intermediate_size"] = s["intermediate_size"]["after"]
            entry["warning"] = s["intermediate_size"].get("llama_cpp_warning")
        else:
            entry["intermediate_size"] = cfg["intermediate_size"]
        entry["params"], entry["safetensors_bytes"] = shard_stats(d)
        entry["transformers_ppl"] = evaluate(d, WIKITEXT / "test.txt", seqlen=512, windows=20, progress=False)["ppl"]
        for q, (gguf, f16, other) in gguf_variants(src, bins, d, work, f"m{k}").items():
            entry[q] = {"gguf_bytes": gguf.stat().st_size, "f16_fallback_tensors": f16, "other_fallback_tensors": other,
                        "llama_ppl": llama_ppl(bins, gguf), **llama_speed(bins, gguf)}
            gguf.unlink()
        print(f"{name}: {json.dumps(entry)}", flush=True)
        results[name] = entry

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = dict(date=time.strftime("%Y-%m-%d"), commit=commit, machine=platform.processor() or platform.machine(),
                llama_cpp=SDIST, threads=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")

    dense = results["dense"]
    print("\n| model | MLP width | parameters | quant | GGUF | vs dense | F16 fallbacks | llama.cpp ppl | "
          "transformers ppl | pp128 t/s | tg64 t/s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, e in results.items():
        for q in QUANTS:
            r = e[q]
            print(f"| {name} | {e['intermediate_size']} | {e['params'] / 1e6:.1f} M | {q} | "
                  f"{r['gguf_bytes'] / 2**20:.1f} MiB | {r['gguf_bytes'] / dense[q]['gguf_bytes']:.3f} | "
                  f"{r['f16_fallback_tensors']} / {r['other_fallback_tensors']} | {r['llama_ppl']:.2f} | {e['transformers_ppl']:.2f} | "
                  f"{r['pp128']:.0f} | {r['tg64']:.0f} |")


if __name__ == "__main__":
    main()
