"""Convert a Hugging Face checkpoint to GGUF (F32, F16, Q8_0) with llama.cpp's own converter.

The converter is not vendored: it is taken at run time from the ``llama-cpp-python`` source
distribution of the same version as the installed wheel (so the GGUF matches the runtime that
reads it) and unpacked under ``bench/.cache/`` (git-ignored).

    python bench/gguf_convert.py bench/.cache/qwen3moe-64e            # -> DIR/gguf/model-*.gguf
    python bench/gguf_convert.py DIR --outtypes f16 --force

Our tokenizer was trained offline, so its pre-tokenizer fingerprint is unknown to the converter,
which refuses it.  The tokenizer is a plain GPT-2 byte-level BPE (see make_checkpoint.py), so the
shim below answers "gpt-2" for the pre-tokenizer; that only affects tokenization metadata, never
weights.
"""

from __future__ import annotations

import argparse
import runpy
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
DEFAULT_VERSION = "0.3.36"  # keep in step with bench/requirements.txt
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Only what the converter imports: the script, its model-class package and the gguf writer.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
SHIM_FLAG = "--run-converter-shim"


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return DEFAULT_VERSION


def fetch_converter(version: str) -> Path:
    """Return a directory holding llama.cpp's converter for ``version``, downloading it once."""
    dest = CACHE_DIR / f"llama.cpp-converter-{version}"
    if (dest / "convert_hf_to_gguf.py").exists():
        return dest
    with tempfile.TemporaryDirectory(dir=CACHE_DIR if CACHE_DIR.exists() else None) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                tmp,
            ],
            check=True,
        )
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        extract_converter(sdist, dest)
    return dest


def extract_converter(sdist: Path, dest: Path) -> None:
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    staging = dest.with_name(dest.name + ".partial")  # never leave a half-extracted cache behind
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name.removeprefix(prefix)
            if m.name.startswith(prefix) and rel.startswith(CONVERTER_PARTS):
                m.name = rel
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        tar.extractall(staging, members=members, filter="data")
    staging.rename(dest)


def run_converter_shim(converter_dir: Path, converter_argv: list[str]) -> None:
    """Run convert_hf_to_gguf.py in this process with the pre-tokenizer check answered."""
    # Same import order the script uses: its bundled gguf-py must shadow the pip `gguf` package,
    # which may be older than the converter.
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    import conversion.base  # importable only after the path set-up above

    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = ["convert_hf_to_gguf.py", *converter_argv]
    runpy.run_path(str(converter_dir / "convert_hf_to_gguf.py"), run_name="__main__")


def convert(model_dir: Path, outfile: Path, outtype: str, converter_dir: Path) -> None:
    # A subprocess per output: the converter sets up global logging and holds tensors until exit.
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        SHIM_FLAG,
        str(converter_dir),
        str(model_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(outfile),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"converter failed for {outtype} (exit {proc.returncode})")
    size_gb = outfile.stat().st_size / 1e9
    print(f"{outtype:5s} -> {outfile} ({size_gb:.2f} GB, {time.perf_counter() - t0:.0f}s)")


def gguf_path(model_dir: Path, outtype: str) -> Path:
    """Where bench_engine.py looks for the GGUF of ``outtype``."""
    return model_dir / "gguf" / f"model-{outtype}.gguf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--outtypes", default=",".join(OUTTYPES), help=f"comma list from {OUTTYPES}")
    p.add_argument("--llama-cpp-version", default=None, help="default: installed llama-cpp-python")
    p.add_argument("--force", action="store_true", help="rebuild GGUFs that already exist")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == SHIM_FLAG:
        run_converter_shim(Path(argv[1]), argv[2:])
        return 0
    args = parse_args(argv)
    outtypes = [t.strip() for t in args.outtypes.split(",") if t.strip()]
    if bad := sorted(set(outtypes) - set(OUTTYPES)):
        raise SystemExit(f"unknown outtype(s): {bad}")
    if not (args.model_dir / "config.json").exists():
        raise SystemExit(f"{args.model_dir} is not a Hugging Face checkpoint (no config.json)")

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    converter_dir = fetch_converter(args.llama_cpp_version or llama_cpp_version())
    for outtype in outtypes:
        out = gguf_path(args.model_dir, outtype)
        if out.exists() and not args.force:
            print(f"{outtype:5s} -> {out} exists; skipping")
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(args.model_dir, out, outtype, converter_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
