"""Bounded fuzzing runs: libFuzzer (with ASan and UBSan) on the oracle's C
request parsers, from a seed corpus per operation, and atheris on its
Python decode path. Longer runs by hand: SHMKEY_FUZZ_SECONDS=600."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .ctools import LIB_CFLAGS, LIB_LDFLAGS, LIB_SOURCES, ROOT

SECONDS = int(os.environ.get("SHMKEY_FUZZ_SECONDS", "12"))
FUZZ = ROOT / "tests" / "fuzz"


@pytest.mark.skipif(not shutil.which("clang"), reason="needs clang with libFuzzer")
def test_libfuzzer_request_parsers(tmp_path: Path) -> None:
    binary = tmp_path / "fuzz_request"
    subprocess.run(["clang", "-g", "-O1", *LIB_CFLAGS, "-fsanitize=fuzzer,address,undefined",
                    "-fno-sanitize-recover=undefined", "-o", str(binary),
                    str(ROOT / "tests" / "c" / "fuzz_request.c"), *map(str, LIB_SOURCES),
                    *LIB_LDFLAGS], check=True, capture_output=True)
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "seeds", corpus)
    run = subprocess.run([str(binary), f"-max_total_time={SECONDS}", "-print_final_stats=1",
                          f"-artifact_prefix={tmp_path}/", str(corpus)],
                         capture_output=True, text=True, timeout=SECONDS + 120)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "seed corpus: files: 14" in run.stderr
    executed = int(run.stderr.split("stat::number_of_executed_units:")[1].split()[0])
    assert executed > 1000


def test_atheris_handler(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    run = subprocess.run([sys.executable, str(FUZZ / "fuzz_handler.py"),
                          f"-max_total_time={SECONDS}", "-print_final_stats=1",
                          f"-artifact_prefix={tmp_path}/"],
                         capture_output=True, text=True, timeout=SECONDS + 120)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "DONE" in run.stderr
