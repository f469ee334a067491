"""benchmarks/gpu_check.py on CPU: the dry run, the report appender, the budget and
timeout logic (with fake quick items), and the result parsers of benchmarks/gpu_items.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_items  # noqa: E402


@pytest.mark.slow
def test_dry_run_lists_every_item_within_budget():
    env = {**os.environ, "CLIP_FAST_JIT_EXT": "0"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    listed = dict(re.findall(r"^\s+\d+\. (\S+)\s+(\d+) s ", out, re.M))
    assert list(listed) == [name for name, _, _ in gpu_check.PLAN]
    total, budget = map(float, re.search(r"total estimate (\d+) s of a (\d+) s budget", out).groups())
    assert total == sum(float(v) for v in listed.values())
    assert total <= budget == gpu_check.DEFAULT_BUDGET_S
    assert int(re.search(r"gpu tests collected: (\d+)", out).group(1)) > 0
    for name in gpu_check.TRAIN_COMMANDS:  # each command validated (accepted or reported)
        assert re.search(rf"trainer command {name}\s+(accepted|NOT ACCEPTED YET: .+)", out)
    print(f"dry run: {time.monotonic() - t0:.1f} s")


def test_plan_items_have_runners_and_fit_the_default_budget():
    names = [item.name for item in gpu_check.build_plan()]
    assert set(names) == set(gpu_items.ITEMS)
    assert sum(item.estimate_s for item in gpu_check.build_plan()) <= gpu_check.DEFAULT_BUDGET_S
    assert all(item.estimate_s > 0 for item in gpu_check.build_plan())
    two = {item.name: item.estimate_s for item in gpu_check.build_plan(gpus=2)}
    assert two["multi_gpu"] == gpu_check.MULTI_GPU_ESTIMATE_S  # the cuda:1 check runs only with 2 GPUs


def _record(name: str, status: str, **data) -> dict:
    return {"item": name, "status": status, "summary": f"{name} summary", "seconds": 1.5, "estimate_s": 2.0,
            "timeout_s": 4.0, "data": data, "log_tail": "last | line"}


def test_report_json_stays_valid_after_each_append(tmp_path):
    report = gpu_check.Report(tmp_path, {"device": "test"})
    assert json.loads((tmp_path / "gpu_report.json").read_text()) == {"meta": {"device": "test"}, "items": []}
    records = [_record("a", "pass", rows=[{"B": 1, "ms": 0.5}, {"B": 2, "ms": 1.25, "note": "x|y"}], bw=3.5),
               _record("b", "timeout"), _record("c", "skipped")]
    for i, rec in enumerate(records, 1):
        report.append(rec)
        doc = json.loads((tmp_path / "gpu_report.json").read_text())
        assert [r["item"] for r in doc["items"]] == [r["item"] for r in records[:i]]
    report.finish({"wall_s": 3.0})
    assert json.loads((tmp_path / "gpu_report.json").read_text())["totals"] == {"wall_s": 3.0}
    md = (tmp_path / "gpu_report.md").read_text()
    assert md.startswith("# clip_fast GPU acceptance run")
    assert "## 1. a: **pass**" in md and "## 2. b: **timeout**" in md and "## 3. c: **skipped**" in md
    assert "| B | ms | note |" in md and "| 2 | 1.25 | x\\|y |" in md  # table with escaped cells
    assert "- bw: 3.5" in md
    assert md.count("output (tail)") == 1  # the log tail only for the timed-out item
    assert not list(tmp_path.glob("*.tmp*"))


def _fake(name: str, code: str, estimate: float = 5.0) -> gpu_check.Item:
    return gpu_check.Item(name, estimate, "fake", (sys.executable, "-c", code))


def _context(tmp_path: Path) -> gpu_check.RunContext:
    work = tmp_path / "work"
    work.mkdir()
    return gpu_check.RunContext(work, tmp_path, dict(os.environ))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie still answers kill(0)
        return f.read().split(")")[-1].split()[0] != "Z"


HANGS_WITH_A_CHILD = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=os.setpgrp)
open(os.environ["GPU_CHECK_WORK"] + "/child.pid", "w").write(str(child.pid))
time.sleep(60)
"""
WRITES_FAIL = """
import json, os
json.dump({"status": "fail", "summary": "3 of 4 wrong", "data": {"n": 4}}, open(os.environ["GPU_CHECK_RESULT"], "w"))
"""


def test_hung_item_is_killed_with_its_children_and_later_items_run(tmp_path):
    ctx = _context(tmp_path)
    report = gpu_check.Report(tmp_path, {})
    items = [_fake("ok", "pass"), _fake("hangs", HANGS_WITH_A_CHILD, estimate=1.0), _fake("crashes", "raise SystemExit(3)"),
             _fake("fails", WRITES_FAIL)]
    t0 = time.monotonic()
    records = gpu_check.run_plan(items, budget_s=60, margin=2.0, ctx=ctx, report=report)
    assert time.monotonic() - t0 < 30
    assert [r["status"] for r in records] == ["pass", "timeout", "error", "fail"]
    hung = records[1]
    assert hung["timeout_s"] == 2.0 and 2.0 <= hung["seconds"] < 10
    child = int((ctx.work_dir / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the hung item's child (own process group) survived"
    assert records[2]["exit_code"] == 3
    assert records[3]["summary"] == "3 of 4 wrong" and records[3]["data"] == {"n": 4}
    doc = json.loads((tmp_path / "gpu_report.json").read_text())
    assert [r["status"] for r in doc["items"]] == ["pass", "timeout", "error", "fail"]


def test_budget_caps_timeouts_and_skips_what_does_not_fit(tmp_path):
    ctx = _context(tmp_path)
    items = [_fake("slow", "import time; time.sleep(30)", estimate=50.0), _fake("next", "pass"), _fake("last", "pass")]
    t0 = time.monotonic()
    records = gpu_check.run_plan(items, budget_s=5.0, margin=2.0, ctx=ctx, report=gpu_check.Report(tmp_path, {}))
    assert time.monotonic() - t0 < 15
    assert records[0]["status"] == "timeout" and records[0]["timeout_s"] <= 5.0
    assert [r["status"] for r in records[1:]] == ["skipped", "skipped"]
    assert "budget exhausted" in records[1]["summary"]


def test_partial_result_of_a_killed_item_is_kept(tmp_path):
    code = ("import json, os, time\n"
            "json.dump({'status': None, 'data': {'rows': [{'B': 8}]}}, open(os.environ['GPU_CHECK_RESULT'], 'w'))\n"
            "time.sleep(30)")
    record = gpu_check.run_item(_fake("partial", code), 1.5, _context(tmp_path))
    assert record["status"] == "timeout" and record["data"] == {"rows": [{"B": 8}]}


def test_trainer_commands_are_checked_without_crashing():
    assert gpu_check.check_trainer_command(["--model", "tiny-vit", "--batch-size", "8"]) is None
    problem = gpu_check.check_trainer_command(["--model", "tiny-vit", "--no-such-flag", "3"])
    assert problem is not None and "--no-such-flag" in problem
    paths = {"shards": "S/{0..1}.tar", "shards_x8": "X", "logs": "L"}
    argv = gpu_check.trainer_argv("accum_32k", paths)
    assert "X" in argv and "L" in argv and not any("{shards" in a or "{logs" in a for a in argv)


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--budget-s", "0"], ["--margin", "0.5"], ["--only", "nope"], ["--wheels", "/no/such/dir"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_cli(argv)
        assert exc.value.code == 2
        assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("fused,strips,expected", [
    ({8: 1.0, 16: 3.0, 32: 9.0}, {8: 2.0, 16: 2.5, 32: 8.0}, 2 ** round(__import__("math").log2(8 * 16))),
    ({8: 1.0, 16: 2.0}, {8: 0.5, 16: 1.0}, 64),  # strips everywhere: at most the smallest B^2
    ({8: 1.0, 16: 2.0}, {8: 1.5, 16: 2.5}, None),  # fused everywhere
    ({8: 1.0, 16: 3.0, 32: 5.0}, {8: 2.0, 16: 2.0, 32: 6.0}, None),  # fused wins the largest: no crossover
])
def test_strip_crossover_from_timings(fused, strips, expected):
    times = {b: {"fused": fused[b], "strips": strips[b]} for b in fused}
    entries, why = gpu_items.proposed_strip_threshold(times)
    assert entries == expected, why


def test_trainer_log_parsing_and_steady_state(tmp_path):
    console = "\n".join(
        f"Train Epoch: 0 [{s}/32 steps (31%)] step {s}/1000  Loss: 5.1  LR: 1.0e-04  Logit Scale: 14.29  "
        f"{1000.0 * s:.1f} samples/s, {1000.0 * s:.1f}/s/gpu  data-wait {s}%  MFU {s}.5%  mem {s}.0/{s + 1}.0 GiB"
        for s in (10, 20, 30))
    records = gpu_items.parse_step_records(tmp_path, console)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[1]["samples_per_s_per_gpu"] == 20000.0 and records[1]["mfu"] == pytest.approx(0.205)
    state = gpu_items.steady_state(records)
    assert state["intervals"] == 2 and state["samples_per_s_per_gpu"] == 25000.0  # first interval dropped
    assert state["peak_allocated_gib"] == 30.0 and state["data_wait"] == pytest.approx(0.25)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 5, "samples_per_s": 9.0, "samples_per_s_per_gpu": 9.0}) + "\n")
    assert [r["step"] for r in gpu_items.parse_step_records(tmp_path, console)] == [5]  # log.jsonl preferred


def test_device_peak_table():
    assert gpu_items.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_items.peak_tflops("NVIDIA H200 NVL") == 835.0
    assert gpu_items.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_items.peak_tflops("NVIDIA H100 NVL") == 835.0
    assert gpu_items.peak_tflops("some other GPU") is None


@pytest.mark.slow
def test_sanitize_driver_calls_every_launcher_under_the_interpreter():
    """The driver's launcher calls are right (arguments, shapes): run them on CPU tensors
    through Triton's interpreter; every case must finish with finite outputs."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CLIP_FAST_BACKEND": "triton", "CLIP_FAST_JIT_EXT": "0"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_sanitize_driver.py"), "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import gpu_sanitize_driver

    assert re.findall(r"^launched (\S+)", proc.stdout, re.M) == list(gpu_sanitize_driver.CASES)
    assert "NONFINITE" not in proc.stdout


def test_item_result_file_is_rewritten_whole_on_each_save(tmp_path):
    res = gpu_items.Result(str(tmp_path / "r.json"), "gpu_items.py x")
    res.save(command="pytest -m gpu", n=1)
    res.add_row({"B": 8})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc == {"status": None, "summary": "", "command": "pytest -m gpu", "data": {"n": 1, "rows": [{"B": 8}]}}
    res.save("pass", "done")
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "pass"
