"""Transparent huge pages for the weights, on Linux with glibc.

Decode streams every weight (1.7 GB for the int8 model) from memory once per step. With 4 KiB pages the
CPU's stream prefetchers stop at each page boundary and every page costs a TLB walk; with 2 MiB pages they
run on. Most distributions set transparent huge pages to ``madvise`` mode, where only memory advised with
``MADV_HUGEPAGE`` gets them, and the weights are allocated by PyTorch and FBGEMM through glibc's malloc,
which advises nothing unless the ``glibc.malloc.hugetlb=1`` tunable is set. Tunables are read once, when a
process starts, so the command line and the server start themselves again with it (``reexec``); a library
user sets it in the environment (README). Measured on the 2-core test VM (BENCHMARKS.md): decode 2–8% faster,
the same peak RSS and load time.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
OPT_OUT = "JVLM_HUGE_PAGES"  # "0": leave the process as it started


def with_tunable(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` plus ``glibc.malloc.hugetlb=1``, keeping any other glibc tunables already set."""
    env = without_tunable(environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1"]))
    return env


def without_tunable(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` without the huge-page tunable (the benchmark's reference runs as a plain process)."""
    env = dict(environ)
    kept = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(TUNABLE + "=")]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    return env


def supported(thp_mode: Path = THP_MODE) -> bool:
    """Whether the tunable gives a process huge pages it would not have without it: Linux, glibc ≥ 2.35 (the
    first with the tunable), transparent huge pages in ``madvise`` mode (in ``always`` mode every large
    allocation gets them anyway, in ``never`` mode none can)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        if "[madvise]" not in thp_mode.read_text():
            return False
    except OSError:
        return False
    libc, version = platform.libc_ver()
    try:
        return libc == "glibc" and tuple(int(part) for part in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Huge pages are supported here and not switched off with ``JVLM_HUGE_PAGES=0``."""
    environ = os.environ if environ is None else environ
    return environ.get(OPT_OUT, "1") != "0" and supported()


def worth_restarting(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return TUNABLE not in environ.get("GLIBC_TUNABLES", "") and wanted(environ)


def reexec() -> None:
    """Replace this process by the same command with the tunable set, where that pays (``worth_restarting``).
    Called first thing by the console entry points, before anything is loaded or read from stdin; returns
    (and the program goes on as it is) where a restart is not worth it or fails."""
    if not worth_restarting():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), with_tunable(dict(os.environ)))
    except OSError:
        return
