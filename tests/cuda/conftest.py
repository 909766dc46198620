"""Builds tests/cuda/emu_runner.cpp: the CUDA kernel bodies of cuda/*.cuh compiled with the host C++
compiler against the SIMT emulator (simt_emu.h), so they run on the CPU.

Two builds: optimised, and with ThreadSanitizer. ``MINILLM_EMU_TSAN=1`` runs every emulated kernel test
on the ThreadSanitizer build (CI does, in a second pass); the emulator's own race test always uses it.
Builds are cached in the temp directory under a hash of the sources and flags.
"""
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
SOURCES = [HERE / "emu_runner.cpp", HERE / "simt_emu.h", *sorted((REPO / "cuda").glob("*.cuh")), REPO / "csrc" / "kernels.h"]
FLAGS = {
    "plain": ["-O2"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
}
TSAN_ALL = os.environ.get("MINILLM_EMU_TSAN", "") == "1"
TSAN_MARK = "ThreadSanitizer"


def _compiler():
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def build(variant: str) -> pathlib.Path:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler found (set CXX) to build the CUDA emulator")
    cmd = [cxx, "-std=c++20", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter", *FLAGS[variant],
           f"-I{REPO / 'cuda'}", f"-I{REPO / 'csrc'}", str(HERE / "emu_runner.cpp")]
    digest = hashlib.sha256(" ".join(cmd).encode())
    for src in SOURCES:
        digest.update(src.read_bytes())
    out_dir = pathlib.Path(tempfile.gettempdir()) / "minillm-emu" / digest.hexdigest()[:16]
    exe = out_dir / f"emu_runner_{variant}"
    if not exe.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{exe.name}.{os.getpid()}"
        res = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
        if res.returncode != 0:
            if variant == "tsan" and not TSAN_ALL and "tsan" in res.stderr.lower():
                pytest.skip(f"ThreadSanitizer unavailable here: {res.stderr.strip()[-300:]}")
            raise RuntimeError(f"building the emulator failed:\n{' '.join(cmd)}\n{res.stderr}")
        os.replace(tmp, exe)
    return exe


class Runner:
    def __init__(self, exe: pathlib.Path, tsan: bool):
        self.exe, self.tsan = exe, tsan

    def run(self, *args, check=True, timeout=900):
        env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66 history_size=4")
        res = subprocess.run([str(self.exe), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                             env=env)
        if check:
            assert res.returncode == 0, f"emu_runner {' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr[-4000:]}"
            assert TSAN_MARK not in res.stderr, f"ThreadSanitizer report:\n{res.stderr[-6000:]}"
        return res


@pytest.fixture(scope="session")
def emu():
    """The runner the kernel tests use: the ThreadSanitizer build when MINILLM_EMU_TSAN=1."""
    variant = "tsan" if TSAN_ALL else "plain"
    return Runner(build(variant), tsan=TSAN_ALL)


@pytest.fixture(scope="session")
def emu_tsan():
    return Runner(build("tsan"), tsan=True)
