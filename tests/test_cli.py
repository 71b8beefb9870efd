"""`python -m mbfused bench` end to end on the smallest list (speed lives in bench/)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_prints_table_and_writes_json(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mbfused", "bench", "--lists", "many-small", "--repeats", "2",
         "--no-compile", "--json", str(out_json)],
        check=True, capture_output=True, text=True,
    )
    assert "many-small" in proc.stdout and "vs best torch" in proc.stdout
    assert "% mem BW" in proc.stdout and "memory bandwidth measured in this run" in proc.stdout
    rows = json.loads(out_json.read_text())
    paths = {row["path"] for row in rows}
    assert {"per_param_add", "per_param_add_float", "foreach_add"} <= paths
    assert not any(p.startswith("compiled") for p in paths)  # --no-compile (they take minutes here)
    assert any(p.startswith("mbfused[") for p in paths)
    for row in rows:
        assert row["gbs"] > 0 and row["median_s"] > 0
        assert abs(row["gbs"] - row["bytes_moved"] / row["median_s"] / 1e9) < 1e-6 * row["gbs"]
        assert row["page_faults_per_call"] >= 0  # CPU rows count the page faults of a call
        assert row["pct_bandwidth"] > 0


def test_run_case_counts_the_page_faults_of_each_path():
    import mmap

    import torch

    from mbfused import benchmarks

    def fresh_temporary():  # touches 64 MB of new memory per call, mapped from the OS
        memory = mmap.mmap(-1, 64 << 20)
        torch.frombuffer(memory, dtype=torch.uint8).fill_(1)
        memory.close()

    case = benchmarks.Case(
        "tiny", "probe", numel=1, bytes_moved=1, roofline_bytes=1, roofline=lambda: None,
        paths={"allocates": fresh_temporary, "nothing": lambda: None}, baselines=("nothing",))
    results = {r.path: r for r in benchmarks.run_case(case, "cpu", repeats=3)}
    assert results["allocates"].page_faults_per_call > 0
    assert results["nothing"].page_faults_per_call < results["allocates"].page_faults_per_call


def test_usage_names_the_command_as_it_was_called(monkeypatch, capsys):
    from mbfused.__main__ import main

    proc = subprocess.run([sys.executable, "-m", "mbfused", "--help"], check=True,
                          capture_output=True, text=True)
    assert proc.stdout.startswith("usage: python -m mbfused ")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mbfused", "--help"])  # the installed script
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: mbfused ")


def test_bench_refuses_flags_it_would_ignore(capsys):
    from mbfused.__main__ import main

    for argv, message in ((["--model", "--json", "x.json"], "--json (--model prints modeled costs only)"),
                          (["--model", "--plot", "x.png"], "--plot (it draws the op benchmark's"),
                          (["--data-parallel", "--plot", "x.png"], "not --data-parallel's"),
                          (["--window", "4"], "--window (it sets the window of --model")):
        assert main(["bench", *argv]) == 2
        assert message in capsys.readouterr().err
    for flag in ("--repeats", "--window", "--world"):
        with pytest.raises(SystemExit):
            main(["bench", flag, "0"])
        assert "expected a positive int, got 0" in capsys.readouterr().err
