"""One-command GPU acceptance run: every GPU number the docs promise, within a wall budget.

    python3 benchmarks/gpu_check.py --wheels .whl --out "$OUT"     # on the GPU machine
    python3 benchmarks/gpu_check.py --dry-run                      # anywhere: imports, GPU-test
                                                                   # collection, trainer flags, plan

Items run in priority order (PLAN below), each in its own process session with
timeout = min(estimate * margin, budget left); a hung item is killed with everything it
started and recorded as 'timeout', and the run goes on. Each result is appended, as it
finishes, to OUT/gpu_report.json (rewritten atomically: valid JSON after every item) and
OUT/gpu_report.md, so a run cut short by its budget or a kill keeps what it finished.
The measurements themselves live in benchmarks/gpu_items.py (one function per item).

The trainer command lines are in TRAIN_COMMANDS, one table, so flag spellings can follow
the trainer; `--dry-run` checks each against the trainer's own `parse_args` and reports
the flags it does not accept yet (without failing).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_BUDGET_S = 480.0
DEFAULT_MARGIN = 2.0
MIN_ITEM_S = 3.0  # an item is not started with less budget than this left
LOG_TAIL_CHARS = 3000
STATUSES = ("pass", "fail", "timeout", "skipped", "error")
# Logs that items leave in the work folder and that are copied to the report folder after
# each item (the device tool brings back at most 8 files: these, the report, the console).
KEPT_LOGS = ("gpu_tests.log",)
KEPT_LOG_BYTES = 4 << 20

# ----------------------------------------------------------------------------------------
# Trainer command lines (flags as `python -m clip_fast.train` spells them; issue 11 moves
# them to open_clip's names). Placeholders: {shards} (8,192 generated samples), {shards_x8}
# (the same shards linked 8 times: 65,536 samples), {logs} (a scratch folder).
# gpu_items runs each for a fixed wall time and reads LOGS/*/log.jsonl or the console lines.
# ----------------------------------------------------------------------------------------
def _common(shards: str = "{shards}", log_every: int = 10) -> list[str]:
    return ["--train-data", shards, "--logs", "{logs}", "--epochs", "1000", "--workers", "12",
            "--log-every-n-steps", str(log_every), "--save-frequency", "0", "--seed", "0"]


TRAIN_COMMANDS: dict[str, list[str]] = {
    # throughput: ViT-B/32, mixed precision (open_clip's usual setting)
    "train_amp_bf16": ["--model", "ViT-B-32", "--precision", "amp_bf16", "--batch-size", "256", *_common()],
    # throughput: bf16 weights + stochastically rounded AdamW (the paper's half-precision setup)
    "train_bf16_sr": ["--model", "ViT-B-32", "--precision", "bf16", "--batch-size", "256", *_common()],
    # host-sync audit: the item sets CLIP_FAST_SYNC_DEBUG=10:30
    "sync_debug": ["--model", "ViT-B-32", "--precision", "amp_bf16", "--batch-size", "256", "--max-steps", "32",
                   *_common()],
    # graph breaks: the item sets TORCH_LOGS=graph_breaks (a small model: compile time)
    "graph_breaks": ["--model", "tiny-vit", "--precision", "amp_bf16", "--batch-size", "64", "--max-steps", "4",
                     "--torchcompile", *_common(log_every=1)],
    # issue 13: the paper's global batch on one device (feature-cached accumulation)
    "accum_32k": ["--model", "ViT-B-32", "--precision", "amp_bf16", "--batch-size", "512", "--accum-freq", "64",
                  "--max-steps", "1", *_common("{shards_x8}", log_every=1)],
}


@dataclasses.dataclass(frozen=True)
class Item:
    """One step of the plan: a command run in its own session, with an honest time estimate
    (H200, Triton compiles and process start included)."""

    name: str
    estimate_s: float
    description: str
    argv: tuple[str, ...]


def _item_argv(name: str) -> tuple[str, ...]:
    return (sys.executable, str(BENCH_DIR / "gpu_items.py"), name)


# (name, estimate in s, what it measures) in priority order; estimates are for one H200
# with 16 cores and include process start, imports and first-use Triton compiles.
PLAN: tuple[tuple[str, float, str], ...] = (
    ("install", 60, "pip install the --wheels and the project (-e, builds the C++ extension)"),
    ("env", 8, "device, driver, versions; measured copy bandwidth and bf16 matmul rate"),
    ("gpu_tests", 80, "pytest tests -m gpu (failures reported, run continues)"),
    ("contrastive", 27, "ContrastiveLoss fwd+bwd bf16 D=512, B 8k/32k/128k: fused vs strip backward vs open_clip; crossover"),
    ("siglip", 17, "SigLipLoss fwd+bwd bf16 D=512, B 32k/128k vs open_clip"),
    ("towers", 30, "benchmarks/test_towers.py: text/image towers and RN50 attention pool vs open_clip"),
    ("adamw", 10, "SR AdamW on the ViT-B/32 parameter set: GB/s vs measured copy bandwidth; torch fused AdamW"),
    ("shards", 10, "generate 8,192 JPEG+caption samples (and an 8x linked copy) for the loader and trainer"),
    ("data", 12, "DALI mixed decode at 224 px if installed, else the torch/PIL loader: images/s"),
    ("train_amp_bf16", 28, "trainer, ViT-B/32 amp_bf16, 25 s: samples/s/gpu, MFU, data-wait, peak memory"),
    ("train_bf16_sr", 28, "trainer, ViT-B/32 bf16 + SR AdamW, 25 s: the same numbers"),
    ("openclip_step", 25, "benchmarks/test_train_step.py: open_clip model+ClipLoss+torch AdamW vs clip_fast step"),
    ("sharded_shape", 7, "contrastive kernels at the sharded shape M=256, N=65,536: TFLOP/s (SM utilisation)"),
    ("sanitize_memcheck", 25, "compute-sanitizer memcheck over every Triton launcher at odd shapes"),
    ("sanitize_initcheck", 20, "compute-sanitizer initcheck over the same launches"),
    ("sync_debug", 20, "trainer with CLIP_FAST_SYNC_DEBUG=10:30: host-sync warnings in steps 10-30"),
    ("graph_breaks", 30, "trainer --torchcompile with TORCH_LOGS=graph_breaks: graph-break count"),
    ("multi_gpu", 2, "launchers on cuda:1 while cuda:0 is current (1 GPU: skipped, no torch import)"),
    ("accum_32k", 40, "trainer ViT-B/32 --batch-size 512 --accum-freq 64: one step of global batch 32,768, amp_bf16"),
)


# With two or more GPUs multi_gpu runs every launcher twice on cuda:1 (imports, compiles).
MULTI_GPU_ESTIMATE_S = 30.0


def gpu_count() -> int:
    """GPUs that nvidia-smi lists (0 without nvidia-smi); no torch import."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def build_plan(gpus: int = 1) -> list[Item]:
    """The plan for a machine with `gpus` GPUs (the estimates in PLAN are for one)."""
    items = [Item(name, float(est), desc, _item_argv(name)) for name, est, desc in PLAN]
    if gpus >= 2:
        items = [dataclasses.replace(it, estimate_s=MULTI_GPU_ESTIMATE_S) if it.name == "multi_gpu" else it
                 for it in items]
    return items


# ------------------------------------------------------------------------------ report


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _md_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of dict rows (columns: the union of keys, first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def item_markdown(index: int, record: dict[str, Any]) -> str:
    """One item's section of gpu_report.md."""
    head = (f"\n## {index}. {record['item']}: **{record['status']}** "
            f"({record.get('seconds', 0):.1f} s; estimate {record.get('estimate_s', 0):.0f} s, "
            f"timeout {record.get('timeout_s', 0):.0f} s)\n\n")
    parts = [head, f"{record.get('summary', '')}\n\n"]
    data = dict(record.get("data") or {})
    rows = data.pop("rows", None)
    if rows:
        parts.append(markdown_table(rows) + "\n\n")
    for key, value in data.items():
        parts.append(f"- {key}: {_md_cell(value) if not isinstance(value, (dict, list)) else json.dumps(value)}\n")
    if record.get("command"):
        parts.append(f"\n`{record['command']}`\n")
    if record["status"] in ("fail", "error", "timeout") and record.get("log_tail"):
        parts.append("\n<details><summary>output (tail)</summary>\n\n```\n" + record["log_tail"] + "\n```\n</details>\n")
    return "".join(parts)


class Report:
    """gpu_report.json ({"meta", "items"}; rewritten atomically after every append, so it
    is valid JSON whenever the run stops) and gpu_report.md (appended section by section)."""

    def __init__(self, out_dir: Path, meta: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / "gpu_report.json"
        self.md_path = self.out_dir / "gpu_report.md"
        self.doc: dict[str, Any] = {"meta": meta, "items": []}
        _atomic_write(self.json_path, json.dumps(self.doc, indent=1))
        header = ["# clip_fast GPU acceptance run\n"]
        header += [f"- {k}: {_md_cell(v)}\n" for k, v in meta.items()]
        self.md_path.write_text("".join(header))

    def append(self, record: dict[str, Any]) -> None:
        self.doc["items"].append(record)
        _atomic_write(self.json_path, json.dumps(self.doc, indent=1))
        with open(self.md_path, "a") as f:
            f.write(item_markdown(len(self.doc["items"]), record))

    def finish(self, totals: dict[str, Any]) -> None:
        self.doc["totals"] = totals
        _atomic_write(self.json_path, json.dumps(self.doc, indent=1))
        with open(self.md_path, "a") as f:
            f.write("\n## Totals\n\n" + "".join(f"- {k}: {_md_cell(v)}\n" for k, v in totals.items()))


# ------------------------------------------------------------------------------ runner


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (an item and everything it started, also
    children that moved to their own process group, such as the trainer)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def _read_result(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclasses.dataclass
class RunContext:
    """Where an item writes: its result JSON, its console log, shared scratch space."""

    work_dir: Path
    out_dir: Path
    env: dict[str, str]


def run_item(item: Item, timeout_s: float, ctx: RunContext) -> dict[str, Any]:
    """Run `item` in a new session; kill the session at `timeout_s`. The record's status
    comes from the item's result file (its own verdict), else its exit code."""
    result_path = ctx.work_dir / f"{item.name}.result.json"
    log_path = ctx.work_dir / f"{item.name}.console.log"
    result_path.unlink(missing_ok=True)
    env = {**ctx.env, "GPU_CHECK_RESULT": str(result_path), "GPU_CHECK_WORK": str(ctx.work_dir),
           "GPU_CHECK_TIMEOUT_S": f"{timeout_s:.1f}"}
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(item.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        kill_session(proc.pid)  # also what it left running (workers, a killed trainer's children)
        proc.wait()
    seconds = time.monotonic() - start
    result = _read_result(result_path)
    if code is None:
        status = "timeout"
        summary = f"killed after {timeout_s:.0f} s; " + (result.get("summary") or "no verdict written")
    else:
        status = result.get("status") or ("pass" if code == 0 else "error")
        if status == "pass" and code != 0:
            status = "error"
        summary = result.get("summary") or f"exit code {code}"
    return {"item": item.name, "status": status, "summary": summary, "seconds": round(seconds, 2),
            "estimate_s": item.estimate_s, "timeout_s": round(timeout_s, 1), "exit_code": code,
            "command": result.get("command", " ".join(item.argv)), "data": result.get("data", {}),
            "log_tail": _tail(log_path)}


def keep_logs(ctx: RunContext) -> None:
    """Copy the tails of KEPT_LOGS from the work folder to the report folder."""
    for name in KEPT_LOGS:
        src = ctx.work_dir / name
        if src.is_file():
            (ctx.out_dir / name).write_text(_tail(src, KEPT_LOG_BYTES))


def skipped_record(item: Item, reason: str) -> dict[str, Any]:
    return {"item": item.name, "status": "skipped", "summary": reason, "seconds": 0.0,
            "estimate_s": item.estimate_s, "timeout_s": 0.0, "data": {}}


def run_plan(items: Sequence[Item], budget_s: float, margin: float, ctx: RunContext, report: Report,
             clock: Callable[[], float] = time.monotonic) -> list[dict[str, Any]]:
    """Run items in order within `budget_s` of wall time; each record is appended to the
    report as soon as its item ends."""
    start = clock()
    records = []
    for item in items:
        remaining = budget_s - (clock() - start)
        if remaining < MIN_ITEM_S:
            record = skipped_record(item, f"budget exhausted ({budget_s:.0f} s)")
        else:
            record = run_item(item, min(item.estimate_s * margin, remaining), ctx)
        records.append(record)
        report.append(record)
        keep_logs(ctx)
        print(f"[gpu_check] {item.name}: {record['status']} ({record['seconds']:.1f} s) {record['summary']}",
              flush=True)
    return records


# ------------------------------------------------------------------------------ dry run


def trainer_argv(name: str, paths: dict[str, str]) -> list[str]:
    """TRAIN_COMMANDS[name] with its placeholders filled from `paths`."""
    return [arg.format(**paths) if "{" in arg else arg for arg in TRAIN_COMMANDS[name]]


def check_trainer_command(argv: list[str]) -> str | None:
    """None if the trainer's own parser accepts `argv`, else its one-line complaint."""
    from clip_fast.train import parse_args

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parse_args(argv)
    except SystemExit:
        lines = [ln for ln in stderr.getvalue().splitlines() if ln.strip()]
        return lines[-1] if lines else "argparse exited"
    except Exception as exc:  # the trainer's own validation (ValueError / ConfigError ...)
        return f"{type(exc).__name__}: {exc}"
    return None


def _placeholder_paths(root: Path) -> dict[str, str]:
    """Scratch stand-ins for the shard folders, for parsers that check that paths exist."""
    paths = {}
    for key in ("shards", "shards_x8"):
        folder = root / key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "shard-000000.tar").touch()
        paths[key] = str(folder / "shard-{000000..000000}.tar")
    paths["logs"] = str(root / "logs")
    return paths


# Modules the run imports (a failure is a real error); optional ones are reported only.
REQUIRED_MODULES = (
    "torch", "numpy", "PIL", "pytest", "clip_fast", "clip_fast.loss", "clip_fast.siglip", "clip_fast.optim",
    "clip_fast.distributed_loss", "clip_fast.model", "clip_fast.data.loader", "clip_fast.data.shards",
    "clip_fast.train", "conftest", "test_optim", "test_data", "gpu_items", "gpu_sanitize_driver",
)
OPTIONAL_MODULES = ("triton", "clip_fast.kernels.contrastive", "clip_fast.kernels.siglip",
                    "clip_fast.kernels.attention_pool", "clip_fast.kernels.adamw", "open_clip",
                    "pytest_benchmark", "nvidia.dali", "xdist", "pytest_timeout")


def import_report() -> tuple[list[str], list[str]]:
    """(errors in required modules, notes on missing optional ones)."""
    import importlib

    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    errors, notes = [], []
    for names, sink in ((REQUIRED_MODULES, errors), (OPTIONAL_MODULES, notes)):
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # ImportError, or an error raised while importing
                sink.append(f"{name}: {type(exc).__name__}: {exc}")
    return errors, notes


def collect_gpu_tests() -> tuple[int, str]:
    """(number of GPU-marked tests collected, pytest's output tail); -1 on a collection error."""
    env = {**os.environ, "CLIP_FAST_JIT_EXT": "0"}  # collection needs no C++ extension build
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "gpu", "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    count = sum(1 for line in proc.stdout.splitlines() if "::" in line)
    return (count if proc.returncode == 0 else -1), out[-LOG_TAIL_CHARS:]


def format_plan(items: Sequence[Item], budget_s: float, margin: float) -> str:
    total = sum(item.estimate_s for item in items)
    lines = [f"plan ({len(items)} items, priority order; timeout = min(estimate x {margin:g}, budget left)):"]
    lines += [f"  {i:2d}. {item.name:<20s} {item.estimate_s:5.0f} s  {item.description}"
              for i, item in enumerate(items, 1)]
    lines.append(f"  total estimate {total:.0f} s of a {budget_s:.0f} s budget"
                 + ("" if total <= budget_s else "  (OVER BUDGET: the last items will be skipped)"))
    return "\n".join(lines)


def dry_run(budget_s: float, margin: float) -> int:
    """Everything that needs no GPU: imports, GPU-test collection, trainer flags, the plan."""
    t0 = time.monotonic()
    errors, notes = import_report()
    for line in errors:
        print(f"import ERROR  {line}")
    for line in notes:
        print(f"import note   {line} (optional: its items skip or it comes from --wheels)")
    count, tail = collect_gpu_tests()
    print(f"gpu tests collected: {count}" if count >= 0 else f"gpu test collection FAILED:\n{tail}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_dry") as scratch:
        paths = _placeholder_paths(Path(scratch))
        for name in TRAIN_COMMANDS:
            problem = check_trainer_command(trainer_argv(name, paths))
            print(f"trainer command {name:<15s} " + ("accepted" if problem is None else f"NOT ACCEPTED YET: {problem}"))
    print(format_plan(build_plan(), budget_s, margin))
    print(f"dry run took {time.monotonic() - t0:.1f} s")
    return 1 if errors or count < 0 else 0


# ------------------------------------------------------------------------------ main


def _default_out() -> str:
    return os.environ.get("OUT") or str(Path.cwd() / "gpu_report")


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall budget of the whole run (s)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="timeout = estimate x margin (capped by budget)")
    p.add_argument("--out", default=None, help="report folder (default: $OUT if set, else ./gpu_report)")
    p.add_argument("--wheels", default=None, help="folder of wheels to pip install --no-index --no-deps first")
    p.add_argument("--only", default=None, help="comma-separated item names to run (default: all)")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: imports, collection, trainer flags, plan")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.margin < 1:
        p.error(f"--margin must be >= 1, got {args.margin}")
    if args.wheels is not None and not Path(args.wheels).is_dir():
        p.error(f"--wheels must be a folder of .whl files, got {args.wheels!r}")
    names = {item.name for item in build_plan()}
    if args.only is not None and not set(args.only.split(",")) <= names:
        p.error(f"--only takes item names from {sorted(names)}, got {args.only!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_cli(argv)
    if args.dry_run:
        return dry_run(args.budget_s, args.margin)
    out = Path(args.out or _default_out()).resolve()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    items = build_plan(gpu_count())
    if args.only:
        items = [item for item in items if item.name in args.only.split(",")]
    meta = {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": sys.version.split()[0], "budget_s": args.budget_s,
            "margin": args.margin, "argv": " ".join(sys.argv), "work_dir": str(work)}
    report = Report(out, meta)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPU_CHECK_REPO": str(REPO_ROOT)}
    if args.wheels:
        env["GPU_CHECK_WHEELS"] = str(Path(args.wheels).resolve())
    print(format_plan(items, args.budget_s, args.margin), flush=True)
    t0 = time.monotonic()
    records = run_plan(items, args.budget_s, args.margin, RunContext(work, out, env), report)
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    report.finish({"wall_s": round(time.monotonic() - t0, 1), **counts})
    print(f"[gpu_check] done in {time.monotonic() - t0:.0f} s: {counts}; report in {out}", flush=True)
    return 0 if counts["fail"] + counts["error"] + counts["timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
