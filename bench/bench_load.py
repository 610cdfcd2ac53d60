"""Cold start: load MiniGPT-4 7B onto the GPU from the official files vs from our bundle.

    python bench/bench_load.py                 # 7B shapes, random weights, needs a GPU (~32 GB of disk)
    python bench/bench_load.py --tiny          # CPU smoke test (model=tiny)

Writes random weights in the official layouts (eva_vit_g.pth fp16 with EVA-CLIP's 40th block and
final norm, blip2_pretrained_flant5xxl.pth with its text branch, a Llama directory saved by
save_pretrained as fp16 safetensors, the MiniGPT-4 .pth with trainer state), makes a bundle with
`python -m minigpt4.weights bundle`, then times `load_model` in a NEW process for each source,
with the page cache of the weight files emptied first (drop_caches when root may, else
posix_fadvise(DONTNEED) after sync: the method used is in the output) and once more warm.
Prints seconds; with $OUT set, writes $OUT/bench_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # official_files.py: writers of the official layouts

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from minigpt4.build import load_model
from minigpt4.config import compose, load_spec
t1 = time.perf_counter()
lm = load_model(load_spec(compose("chat", json.loads(sys.argv[1]))))
if torch.cuda.is_available():
    torch.cuda.synchronize()
t2 = time.perf_counter()
gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "label": lm.label, "gpu_peak_gb": gb}))
"""


def make_official(directory: Path, model: str, device: str) -> list[str]:
    """Random weights of `model`'s shapes in the four official files; returns checkpoint overrides."""
    import torch
    from official_files import write_blip2, write_eva_vit, write_llama_dir, write_minigpt4

    from minigpt4.build import load_model
    from minigpt4.config import compose, load_spec

    start = time.perf_counter()
    dtype = torch.float16 if device != "cpu" else torch.float32
    lm = load_model(load_spec(compose("chat", [f"model={model}", "checkpoint=random", f"gpu={device}"])), dtype=dtype)
    m = lm.model
    for part in (m.vision_model, m.qformer, m.llama_proj):  # small parts to the CPU: files hold CPU tensors
        part.cpu()
    m.query_tokens.data = m.query_tokens.data.cpu()
    write_eva_vit(m, directory / "eva_vit_g.pth", dtype=torch.float16)  # the real file may be fp16
    write_blip2(m, directory / "blip2_pretrained_flant5xxl.pth")
    write_llama_dir(m, directory / "llm")  # save_pretrained: safetensors in the LLM's dtype
    write_minigpt4(m, directory / "pretrained_minigpt4.pth")
    del lm, m
    print(f"wrote official-layout files in {time.perf_counter() - start:.0f}s")
    return [
        "checkpoint=random",
        f"checkpoint.vit={directory / 'eva_vit_g.pth'}",
        f"checkpoint.qformer={directory / 'blip2_pretrained_flant5xxl.pth'}",
        f"checkpoint.llm={directory / 'llm'}",
        f"checkpoint.proj={directory / 'pretrained_minigpt4.pth'}",
    ]


def _files(paths: list[Path]) -> list[Path]:
    return [f for root in paths for f in ([root] if root.is_file() else sorted(root.rglob("*"))) if f.is_file()]


def resident_fraction(paths: list[Path]) -> float:
    """Share of the files' pages in the page cache (mmap + mincore), to check that a load was cold."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for file in _files(paths):
        size = file.stat().st_size
        if not size:
            continue
        pages = (size + page - 1) // page
        fd = os.open(file, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) == 0:
                resident += sum(v & 1 for v in bytes(vec))
                total += pages
            libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def evict(paths: list[Path], drop_caches: bool) -> str:
    """Empty the page cache of these files (posix_fadvise DONTNEED after sync; the whole system's
    cache only with --drop-caches); returns the method and the resident share left."""
    os.sync()
    method = "posix_fadvise"
    for file in _files(paths):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if drop_caches:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            method = "drop_caches"
        except OSError:
            method = "posix_fadvise (drop_caches refused)"
    return f"{method}, {100 * resident_fraction(paths):.0f}% cached"


def timed_load(overrides: list[str], paths: list[Path], cold: bool, drop_caches: bool = False) -> dict:
    method = evict(paths, drop_caches) if cold else f"warm, {100 * resident_fraction(paths):.0f}% cached"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"load failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result.update(process_s=wall, cache=method)
    return result


def file_gb(paths: list[Path]) -> float:
    return sum(f.stat().st_size for f in _files(paths)) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="model=tiny on the CPU (smoke test)")
    parser.add_argument("--dir", help="where to write the weights (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=2, help="cold loads per source")
    parser.add_argument("--drop-caches", action="store_true",
                        help="also empty the whole system's page cache before each cold load (root only)")
    args = parser.parse_args()
    model, device = ("tiny", "cpu") if args.tiny else ("7b", "0")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        official = make_official(tmp, model, device)
        official_paths = [Path(o.split("=", 1)[1]) for o in official[1:]]
        bundle_dir = tmp / "bundle"
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "minigpt4.weights", "bundle", f"model={model}", f"gpu={device}", *official,
               "--out", str(bundle_dir)] + (["--dtype", "fp32"] if device == "cpu" else [])
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        bundle_s = time.perf_counter() - start
        sources = {
            "official": ([f"model={model}", f"gpu={device}", *official], official_paths),
            "bundle": ([f"model={model}", f"gpu={device}", "checkpoint=bundle", f"checkpoint.bundle={bundle_dir}"],
                       [bundle_dir]),
        }
        results = {"model": model, "device": device, "bundle_write_s": bundle_s, "sources": {}}
        for name, (overrides, paths) in sources.items():
            runs = [timed_load(overrides, paths, True, args.drop_caches) for _ in range(args.repeats)]
            runs.append(timed_load(overrides, paths, cold=False))
            results["sources"][name] = {"files_gb": file_gb(paths), "runs": runs}

    print(f"\nmodel={model} device={device}; bundle written in {bundle_s:.1f}s")
    print(f"{'source':9} {'files GB':>8} {'page cache before load':28} {'load_model s':>12} {'process s':>10} {'GPU peak GB':>11}")
    for name, entry in results["sources"].items():
        for run in entry["runs"]:
            print(f"{name:9} {entry['files_gb']:8.2f} {run['cache']:28} {run['load_s']:12.2f} "
                  f"{run['process_s']:10.2f} {run['gpu_peak_gb']:11.2f}")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "bench_load.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
