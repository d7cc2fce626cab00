"""Transparent huge pages for the weights (src/jvlm/hugepages.py): the restart of the command line and server."""

import os
import subprocess
import sys

from jvlm import hugepages


def test_tunable_is_added_and_removed_keeping_the_others():
    env = hugepages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/x"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and env["HOME"] == "/x"
    assert hugepages.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert hugepages.with_tunable(env)["GLIBC_TUNABLES"].count("hugetlb") == 1
    assert hugepages.without_tunable(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/x"}
    assert "GLIBC_TUNABLES" not in hugepages.without_tunable(hugepages.with_tunable({}))


def test_support_follows_the_kernels_mode(tmp_path, monkeypatch):
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    assert not hugepages.supported(mode)
    mode.write_text("[always] madvise never\n")  # every large allocation gets them already
    assert not hugepages.supported(mode)
    assert not hugepages.supported(tmp_path / "missing")
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert hugepages.supported(mode)
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.31"))  # no such tunable yet
    assert not hugepages.supported(mode)
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("", ""))  # musl
    assert not hugepages.supported(mode)


def test_no_restart_when_set_or_switched_off(monkeypatch):
    monkeypatch.setattr(hugepages, "supported", lambda: True)
    assert hugepages.worth_restarting({})
    assert not hugepages.worth_restarting({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not hugepages.worth_restarting({"JVLM_HUGE_PAGES": "0"})


CHILD = """
import os, sys, torch
from jvlm import hugepages
hugepages.reexec()
x = torch.ones(64 << 20, dtype=torch.uint8)  # touched: faulted in now
with open("/proc/self/smaps_rollup") as f:
    huge = next((int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")), 0)
print(os.environ.get("GLIBC_TUNABLES", "-"), huge, " ".join(sys.argv[1:]))
"""


def test_the_process_restarts_itself_with_huge_pages():
    env = hugepages.without_tunable(dict(os.environ))
    env.pop(hugepages.OPT_OUT, None)
    out = subprocess.run([sys.executable, "-c", CHILD, "a", "b c"], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.split(maxsplit=2)
    tunables, huge_kib, args = out[0], int(out[1]), out[2].strip()
    assert args == "a b c"  # the same command line again
    if hugepages.wanted(env):
        assert tunables == "glibc.malloc.hugetlb=1" and huge_kib >= 2048, out
    else:
        assert tunables == "-", out
    env[hugepages.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120,
                         check=True).stdout.split()
    assert out[0] == "-", out
