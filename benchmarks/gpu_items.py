"""The measurements of benchmarks/gpu_check.py, one function per plan item.

    python benchmarks/gpu_items.py ITEM        # normally started by gpu_check.py

Each item writes its verdict to $GPU_CHECK_RESULT as JSON ({"status", "summary",
"command", "data"}), rewritten after every partial result, so an item killed by its
timeout still leaves what it measured. Scratch files (shards, logs, env.json with the
measured ceilings) live in $GPU_CHECK_WORK. GPU timings: one warm-up call (compiles,
autotuning, allocator), then a few rounds timed with CUDA events; median reported.
Peak rates: dense bf16 tensor-core FLOP/s by device name (datasheet), and the bf16
matmul rate and copy bandwidth measured by the `env` item in the same run.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

TRAIN_RUN_S = 25.0  # wall time of each throughput run of the trainer (start-up included)

# Dense bf16 tensor-core peak (TFLOP/s, datasheet) by device-name substring, most specific
# first. H200 SXM has the H100 SXM's rates; the NVL parts run at lower clocks (~835). The
# `env` item measures the device's own bf16 matmul rate in the same run.
DENSE_BF16_PEAK_TFLOPS = (
    ("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("GH200", 989.0), ("H200", 989.0),
    ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
)


class Skip(Exception):
    """Raised by an item that cannot run here (the reason becomes its summary)."""


class Failed(Exception):
    """Raised by an item whose check ran and failed (the message becomes its summary)."""


class Result:
    """The item's result file, rewritten atomically on every save."""

    def __init__(self, path: str | None, command: str) -> None:
        self.path = Path(path) if path else None
        self.doc: dict[str, Any] = {"status": None, "summary": "", "command": command, "data": {}}

    @property
    def data(self) -> dict[str, Any]:
        return self.doc["data"]

    def save(self, status: str | None = None, summary: str | None = None, **data: Any) -> None:
        if status is not None:
            self.doc["status"] = status
        if summary is not None:
            self.doc["summary"] = summary
        if "command" in data:  # what the item ran, shown as the report's command line
            self.doc["command"] = data.pop("command")
        self.data.update(data)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.doc, indent=1, default=str))
            os.replace(tmp, self.path)
        else:
            print(json.dumps(self.doc, indent=1, default=str))

    def add_row(self, row: dict[str, Any]) -> None:
        self.data.setdefault("rows", []).append(row)
        self.save()


def work_dir() -> Path:
    path = Path(os.environ.get("GPU_CHECK_WORK") or (REPO_ROOT / "gpu_report" / "work"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def item_timeout_s() -> float:
    return float(os.environ.get("GPU_CHECK_TIMEOUT_S", "600"))


# ------------------------------------------------------------------------------ helpers


def require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    return torch


def peak_tflops(device_name: str) -> float | None:
    """Datasheet dense bf16 peak of the device (None when the name is not in the table)."""
    for key, value in DENSE_BF16_PEAK_TFLOPS:
        if key in device_name:
            return value
    return None


def cuda_time_ms(fn: Callable[[], Any], rounds: int, warmup: int = 1) -> float:
    """Median milliseconds of `fn` over `rounds` calls timed by CUDA events, after `warmup`."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) on random bytes."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), rounds=10, warmup=2)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """bf16 n x n x n product rate on random data (TFLOP/s)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, rounds=10, warmup=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def load_env() -> dict[str, Any]:
    """What the `env` item measured (empty if it did not run)."""
    try:
        return json.loads((work_dir() / "env.json").read_text())
    except (OSError, ValueError):
        return {}


def rate_columns(flops: float, ms: float, env: dict[str, Any]) -> dict[str, Any]:
    """TFLOP/s and its share of the datasheet peak and of the measured matmul rate."""
    tflops = flops / (ms * 1e-3) / 1e12
    row = {"TFLOP/s": round(tflops, 1)}
    if env.get("peak_bf16_tflops"):
        row["% dense peak"] = round(100 * tflops / env["peak_bf16_tflops"], 1)
    if env.get("matmul_bf16_tflops"):
        row["% measured matmul"] = round(100 * tflops / env["matmul_bf16_tflops"], 1)
    return row


def run_logged(argv: list[str], log_path: Path, timeout_s: float, env: dict[str, str] | None = None,
               cwd: Path = REPO_ROOT) -> int | None:
    """Run a command (its own process group) with output to `log_path`; None on timeout."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}, preexec_fn=os.setpgrp)
        try:
            return proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return None


def tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


# ------------------------------------------------------------------------------ install, env


def _pip_step(res: Result, name: str, argv: list[str], timeout_s: float, env: dict[str, str] | None = None) -> bool:
    """Run one pip command; record its time, exit code and (on failure) its log tail."""
    t0 = time.monotonic()
    log = work_dir() / f"install_{name}.log"
    code = run_logged(argv, log, timeout_s, env=env)
    res.save(**{f"{name}_s": round(time.monotonic() - t0, 1), f"{name}_exit": code})
    if code != 0:
        res.save(**{f"{name}_log": tail(log)})
    return code == 0


def item_install(res: Result) -> None:
    """The wheels of --wheels (no index, no deps), then the project itself, editable, with
    the C++ extension built by setup.py against the preinstalled torch; if that build
    fails, the project again without it (clip_fast then compiles it on first use)."""
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check", "-q"]
    deadline = time.monotonic() + item_timeout_s() - 8  # the import probe below needs a few s
    failed = []
    wheels = os.environ.get("GPU_CHECK_WHEELS")
    files = sorted(glob.glob(os.path.join(wheels, "*.whl"))) if wheels else []
    if wheels and not files:
        res.save(wheels_status=f"no .whl files in {wheels}")
    if files and not _pip_step(res, "wheels", [*pip, "--no-compile", *files], deadline - time.monotonic()):
        failed.append("wheels")
    project = [*pip, "--no-build-isolation", "-e", str(REPO_ROOT)]
    # keep ~20 s for installing without the extension if its build fails or overruns
    if not _pip_step(res, "project", project, deadline - time.monotonic() - 20):
        failed.append("project")
        if _pip_step(res, "project_without_extension", project, deadline - time.monotonic(),
                     env={"CLIP_FAST_BUILD_EXT": "0"}):
            failed[-1] = "project with the C++ extension (installed without it)"
    probe = subprocess.run([sys.executable, "-c", "import torch; from clip_fast import _C; import clip_fast; "
                            "print(clip_fast.__file__)"], capture_output=True, text=True, cwd="/")
    res.save(extension_built=probe.returncode == 0, clip_fast_from=probe.stdout.strip())
    if failed:
        raise Failed(f"pip failed for: {', '.join(failed)}")
    res.save("pass", f"installed ({'wheels + ' if files else ''}project); C++ extension "
                     f"{'built' if probe.returncode == 0 else 'NOT built (JIT on first use)'}")


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_smi(query: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"


def item_env(res: Result) -> None:
    torch = require_cuda()
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    dali = next((v for v in (_version(d) for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120"))
                 if v != "not installed"), "not installed")
    info = {"device": name, "gpus": torch.cuda.device_count(), "sms": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _nvidia_smi("driver_version"), "kernel": os.uname().release,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "open_clip": _version("open_clip_torch"), "dali": dali, "timm": _version("timm"),
            "peak_bf16_tflops": peak_tflops(name),
            "peak_note": "dense bf16 datasheet peak by name (H100/H200 SXM 989, NVL ~835); "
                         "matmul_bf16_tflops: measured on this device in this run"}
    res.save(**info)
    info["copy_gbs"] = round(copy_bandwidth_gbs(), 1)
    info["matmul_bf16_tflops"] = round(matmul_tflops(), 1)
    (work_dir() / "env.json").write_text(json.dumps(info, indent=1))
    res.save("pass", f"{name}, driver {info['driver']}, torch {info['torch']}, triton {info['triton']}, "
                     f"DALI {dali}; copy {info['copy_gbs']:.0f} GB/s, bf16 matmul {info['matmul_bf16_tflops']:.0f} "
                     f"TFLOP/s (datasheet {info['peak_bf16_tflops']})", **info)


# ------------------------------------------------------------------------------ GPU tests


def _junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts, failed
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            if case.find(kind) is not None:
                counts[key] += 1
                if kind != "skipped":
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    return counts, failed


def item_gpu_tests(res: Result) -> None:
    import importlib.util

    require_cuda()
    junit = work_dir() / "gpu_tests.junit.xml"
    argv = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE",
            "--continue-on-collection-errors", f"--junitxml={junit}"]
    if importlib.util.find_spec("xdist"):
        argv += ["-n", "4"]  # Triton compiles in parallel; each worker has its own CUDA context
    if importlib.util.find_spec("pytest_timeout"):
        argv += ["--timeout", "120"]
    res.save(command=" ".join(argv[1:]))
    log = work_dir() / "gpu_tests.log"
    code = run_logged(argv, log, item_timeout_s() - 5)
    counts, failed = _junit_counts(junit)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    res.save(**counts, passed=passed, failed_tests=failed[:50], exit_code=code)
    if code is None:
        raise Failed(f"pytest hit its timeout; {passed} passed so far. Tail: {tail(log, 400)}")
    status = "pass" if code == 0 else "fail"
    res.save(status, f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
             + (f": {', '.join(failed[:8])}" if failed else ""), log_tail=tail(log) if failed or code else "")


# ------------------------------------------------------------------------------ losses


def _open_clip_losses():
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        return None, None
    return ClipLoss, SigLipLoss


def _time_loss(loss_fn, B: int, D: int, scale: float, bias: float | None, rounds: int) -> tuple[float, float]:
    """(median ms, peak extra MiB) of one forward + backward of `loss_fn` on unit bf16 features."""
    import torch
    from conftest import peak_extra_memory, unit_features

    image, text = unit_features(B, D, "cuda", torch.bfloat16)
    s = torch.tensor(scale, device="cuda", requires_grad=True)
    b = None if bias is None else torch.tensor(bias, device="cuda", requires_grad=True)
    args = (image, text, s) if b is None else (image, text, s, b)

    def step() -> None:
        for t in args:
            t.grad = None
        loss_fn(*args).backward()

    ms = cuda_time_ms(step, rounds=rounds)
    return ms, peak_extra_memory(step, "cuda") / 2**20


def proposed_strip_threshold(times: dict[int, dict[str, float]]) -> tuple[int | None, str]:
    """From {B: {"fused": ms, "strips": ms}}: the STRIP_MIN_ENTRIES (B x B entries) at which
    the strip backward starts winning for good, and a sentence saying why."""
    sizes = sorted(b for b in times if {"fused", "strips"} <= set(times[b]))
    if not sizes:
        return None, "no size timed both backwards"
    strips_win = [times[b]["strips"] < times[b]["fused"] for b in sizes]
    if all(strips_win):
        return sizes[0] ** 2, f"strips won at every measured B (from {sizes[0]}): threshold at most {sizes[0]}^2"
    if not any(strips_win):
        return None, f"fused won at every measured B (up to {sizes[-1]}): keep fused up to at least {sizes[-1]}^2"
    first = max(i for i, win in enumerate(strips_win) if not win) + 1  # strips wins from here on
    if first == len(sizes):
        return None, f"fused won at the largest B ({sizes[-1]}): no stable crossover"
    lo, hi = sizes[first - 1], sizes[first]
    entries = 2 ** round(math.log2(lo * hi))  # geometric middle of lo^2 and hi^2
    return entries, f"fused faster at B={lo}, strips from B={hi}: STRIP_MIN_ENTRIES = 2**{int(math.log2(entries))}"


def item_contrastive(res: Result) -> None:
    """ContrastiveLoss fwd + bwd, bf16, D = 512: the two Triton backwards and open_clip."""
    require_cuda()
    from clip_fast import ContrastiveLoss
    from clip_fast.kernels import contrastive
    from conftest import materialised_fits

    env, D = load_env(), 512
    ClipLoss, _ = _open_clip_losses()
    times: dict[int, dict[str, float]] = {}
    for B in (8192, 32768, 131072):
        impls = {"fused": ContrastiveLoss(), "strips": ContrastiveLoss()}
        if ClipLoss is not None and B >= 32768 and materialised_fits(B, "cuda"):
            impls["open_clip"] = ClipLoss()
        for impl, fn in impls.items():
            os.environ["CLIP_FAST_CONTRASTIVE_BACKWARD"] = impl if impl != "open_clip" else "auto"
            ms, peak = _time_loss(fn, B, D, 14.3, None, rounds=3 if B > 32768 else 5)
            times.setdefault(B, {})[impl] = ms
            res.add_row({"B": B, "impl": impl, "ms": round(ms, 3), **rate_columns(8.0 * B * B * D, ms, env),
                         "peak extra MiB": round(peak, 1)})
    entries, why = proposed_strip_threshold(times)
    skipped = "" if ClipLoss is not None else " (open_clip not installed: no baseline)"
    res.save("pass", f"proposed setting: {why} (now 2**{int(math.log2(contrastive.STRIP_MIN_ENTRIES))}){skipped}",
             proposed_strip_min_entries=entries, current_strip_min_entries=contrastive.STRIP_MIN_ENTRIES,
             flops_counted="8 B^2 D (4 passes over S) for every implementation")


def item_siglip(res: Result) -> None:
    require_cuda()
    from clip_fast import SigLipLoss
    from conftest import materialised_fits

    env, D = load_env(), 512
    _, OpenClipSigLip = _open_clip_losses()
    for B in (32768, 131072):
        impls = {"clip_fast": SigLipLoss()}
        if OpenClipSigLip is not None and materialised_fits(B, "cuda"):
            impls["open_clip"] = OpenClipSigLip()
        for impl, fn in impls.items():
            ms, peak = _time_loss(fn, B, D, 10.0, -10.0, rounds=3 if B > 32768 else 5)
            res.add_row({"B": B, "impl": impl, "ms": round(ms, 3), **rate_columns(6.0 * B * B * D, ms, env),
                         "peak extra MiB": round(peak, 1)})
    res.save("pass", "SigLipLoss timed" + ("" if OpenClipSigLip else " (open_clip not installed: no baseline)"),
             flops_counted="6 B^2 D (3 passes over S) for both")


def item_sharded_shape(res: Result) -> None:
    """The distributed loss's per-rank block (M = 256 local rows, N = 65,536 gathered
    columns): one forward pass and one backward, both backwards, as TFLOP/s."""
    torch = require_cuda()
    from clip_fast.contrastive_ops import logit_grads, lse_stats
    from conftest import unit_features

    env, M, N, D = load_env(), 256, 65536, 512
    image, _ = unit_features(M, D, "cuda", torch.bfloat16)
    _, text = unit_features(N, D, "cuda", torch.bfloat16)
    image, text = image.detach(), text.detach()
    scale = torch.tensor([14.3], device="cuda")
    row, col = lse_stats(image, text, scale, None)
    ms = cuda_time_ms(lambda: lse_stats(image, text, scale, None), rounds=10)
    res.add_row({"op": "lse_stats (forward)", "M": M, "N": N, "ms": round(ms, 3), **rate_columns(2.0 * M * N * D, ms, env)})
    for mode in ("fused", "strips"):
        os.environ["CLIP_FAST_CONTRASTIVE_BACKWARD"] = mode
        ms = cuda_time_ms(lambda: logit_grads(image, text, scale, None, row, col, diag_offset=3 * M), rounds=10)
        res.add_row({"op": f"logit_grads ({mode})", "M": M, "N": N, "ms": round(ms, 3),
                     **rate_columns(6.0 * M * N * D, ms, env)})
    res.save("pass", "sharded shape timed (low % of peak = idle SMs: issue 12 item 13)",
             flops_counted="forward 2MND, backward 6MND (S recomputed, G@T, G^T@I)")


# ------------------------------------------------------------------------------ pytest-benchmark files


def run_benchmark_file(res: Result, test_file: str, columns: tuple[str, ...]) -> None:
    """Run one benchmarks/ file under pytest-benchmark and report its rows."""
    require_cuda()
    out = work_dir() / (Path(test_file).stem + ".benchmark.json")
    argv = [sys.executable, "-m", "pytest", test_file, "--benchmark-only", f"--benchmark-json={out}", "-q",
            "-p", "no:cacheprovider", "--benchmark-min-rounds=3", "--benchmark-max-time=0.5",
            "--benchmark-disable-gc", "-rfE"]
    res.save(command=" ".join(argv[1:]))
    log = work_dir() / (Path(test_file).stem + ".log")
    code = run_logged(argv, log, item_timeout_s() - 5, cwd=BENCH_DIR)
    try:
        benches = json.loads(out.read_text())["benchmarks"]
    except (OSError, ValueError, KeyError):
        benches = []
    for b in benches:
        extra = b.get("extra_info", {})
        res.add_row({"test": b["name"], "median ms": round(1e3 * b["stats"]["median"], 3),
                     **{c: extra[c] for c in columns if c in extra}})
    if code != 0:
        raise Failed(f"pytest exit code {code}; {len(benches)} benchmarks recorded. Tail: {tail(log, 600)}")
    res.save("pass", f"{len(benches)} benchmarks")


def item_towers(res: Result) -> None:
    if _open_clip_losses()[0] is None:
        raise Skip("open_clip not installed (bring it with --wheels): test_towers.py compares against it")
    run_benchmark_file(res, "test_towers.py", ("samples_per_s", "batch", "peak_extra_memory_mib", "max_len"))


def item_openclip_step(res: Result) -> None:
    if _open_clip_losses()[0] is None:
        raise Skip("open_clip not installed (bring it with --wheels): no baseline step")
    run_benchmark_file(res, "test_train_step.py",
                       ("impl", "model", "batch", "samples_per_s", "speedup_vs_openclip", "peak_extra_memory_mib"))


# ------------------------------------------------------------------------------ optimizer


def item_adamw(res: Result) -> None:
    """SR AdamW (bf16 weights, grads, moments) on the ViT-B/32 parameter set against the
    copy bandwidth measured here: 14 bytes per parameter (read w, g, m, v; write w, m, v)."""
    torch = require_cuda()
    from clip_fast.optim import AdamW
    from test_optim import N_PARAMS, _params

    copy = copy_bandwidth_gbs()
    for variant, nbytes in (("clip_fast SR bf16", 14), ("torch fused fp32", 28)):
        if variant.startswith("clip_fast"):
            params = _params(torch.bfloat16, "cuda")
            opt = AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, seed=0,
                        state_dtype=torch.bfloat16)
        else:
            params = _params(torch.float32, "cuda")
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, fused=True)
        ms = cuda_time_ms(opt.step, rounds=10, warmup=2)
        gbs = nbytes * N_PARAMS / (ms * 1e-3) / 1e9
        floor_ms = nbytes * N_PARAMS / (copy * 1e9) * 1e3
        res.add_row({"optimizer": variant, "params": N_PARAMS, "bytes/param": nbytes, "ms": round(ms, 3),
                     "GB/s": round(gbs, 1), "% copy bw": round(100 * gbs / copy, 1),
                     "x memory floor": round(ms / floor_ms, 2)})
        del params, opt
        torch.cuda.empty_cache()
    res.save("pass", f"copy bandwidth measured here {copy:.0f} GB/s; target: SR AdamW within 1.25x of its floor",
             copy_gbs=round(copy, 1))


# ------------------------------------------------------------------------------ data


WORDS = ("a photo of the small large red blue green dog cat bird car tree house street man woman child with on in "
         "at near sitting standing running under old new white black yellow wooden table beach city night view "
         "two three people group field sky water boat mountain road flower garden window close up shot").split()


def _sample(i: int) -> tuple[bytes, str]:
    """Sample i: a photo-like JPEG of ~400x300 (test_data's generator) and a caption of
    lognormal length (median 12 words)."""
    import numpy as np
    from test_data import _photo_like

    rng = np.random.default_rng(i)
    w, h = int(rng.integers(360, 481)), int(rng.integers(270, 361))
    n = int(min(60, max(3, round(math.exp(math.log(12) + 0.5 * rng.standard_normal())))))
    return _photo_like(rng, w, h), " ".join(rng.choice(WORDS, size=n))


def _link_copies(src: Path, dst: Path, copies: int) -> list[str]:
    """`copies` hard-linked replicas of a ShardWriter folder, with a manifest vouching for them."""
    from clip_fast.data.shards import MANIFEST_NAME

    manifest = json.loads((src / MANIFEST_NAME).read_text())
    dst.mkdir(parents=True, exist_ok=True)
    shards = []
    for c in range(copies):
        for s in manifest["shards"]:
            tar, idx = f"copy{c}-{s['tar']}", f"copy{c}-{s['idx']}"
            for a, b in ((s["tar"], tar), (s["idx"], idx)):
                if not (dst / b).exists():
                    os.link(src / a, dst / b)
            shards.append({**s, "tar": tar, "idx": idx})
    (dst / MANIFEST_NAME).write_text(json.dumps({**manifest, "shards": shards}, indent=1))
    return [str(dst / s["tar"]) for s in shards]


def item_shards(res: Result, n: int = 8192, copies: int = 8) -> None:
    from multiprocessing import Pool

    from clip_fast.data.shards import ShardWriter

    root = work_dir()
    with Pool(min(16, os.cpu_count() or 1)) as pool, ShardWriter(root / "shards", shard_size=1024) as writer:
        for image, caption in pool.imap(_sample, range(n), chunksize=64):
            writer.write(image, caption)
    paths = writer.close()
    linked = _link_copies(root / "shards", root / "shards_x8", copies)
    spec = {"shards": str(root / "shards" / ("shard-{000000..%06d}.tar" % (len(paths) - 1))),
            "shards_x8": str(root / "shards_x8" / "*.tar"), "logs": str(root / "logs"),
            "shard_list": paths, "shard_list_x8": linked}
    (root / "shards.json").write_text(json.dumps(spec, indent=1))
    size = sum(os.path.getsize(p) for p in paths)
    res.save("pass", f"{n} samples in {len(paths)} shards ({size / 2**20:.0f} MiB), x{copies} linked",
             samples=n, shards=len(paths), mib=round(size / 2**20, 1))


def load_shards() -> dict[str, Any]:
    try:
        return json.loads((work_dir() / "shards.json").read_text())
    except (OSError, ValueError):
        raise Skip("no generated shards (the shards item did not finish)") from None


def item_data(res: Result) -> None:
    torch = require_cuda()
    from clip_fast.data.loader import dali_available
    from test_data import _clip_fast_epoch_fn

    shards = load_shards()["shard_list"]
    backend = "dali" if dali_available() else "torch"
    workers, batch = min(16, os.cpu_count() or 1), 256
    epoch = _clip_fast_epoch_fn(shards, batch, workers, backend, "cuda", torch.bfloat16)
    epoch()  # warm-up: pipeline build, worker start, page cache
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        n = epoch()
        times.append(time.perf_counter() - t0)
    rate = n / statistics.median(times)
    note = "" if backend == "dali" else " (DALI not installed: torch/PIL loader)"
    res.save("pass", f"{backend}: {rate:.0f} images/s at 224 px{note}", backend=backend, images_per_s=round(rate, 1),
             images_per_epoch=n, workers=workers, batch=batch, dali="installed" if backend == "dali" else "not installed",
             target_images_per_s=5000 if backend == "dali" else None)


# ------------------------------------------------------------------------------ trainer


_STEP_LINE = re.compile(r"step (\d+)/\d+.*?([\d.]+) samples/s(?:, ([\d.]+)/s/gpu)?\s+data-wait (\d+)%"
                        r"(?:\s+MFU ([\d.]+)%)?(?:.*?mem ([\d.]+)/([\d.]+) GiB)?")


def parse_step_records(logs_dir: Path, console: str) -> list[dict[str, Any]]:
    """The trainer's logged intervals: LOGS/*/log.jsonl if written, else its console lines."""
    records = []
    for path in glob.glob(str(logs_dir / "**" / "log.jsonl"), recursive=True):
        for line in Path(path).read_text().splitlines():
            with_step = json.loads(line) if line.strip().startswith("{") else {}
            if "step" in with_step and "samples_per_s" in with_step:
                records.append(with_step)
    if records:
        return sorted(records, key=lambda r: r["step"])
    for m in _STEP_LINE.finditer(console):
        step, sps, per_gpu, wait, mfu, mem, reserved = m.groups()
        rec = {"step": int(step), "samples_per_s": float(sps), "samples_per_s_per_gpu": float(per_gpu or sps),
               "data_wait": int(wait) / 100, "mfu": float(mfu) / 100 if mfu else None}
        if mem:
            rec.update(max_memory_allocated_gib=float(mem), max_memory_reserved_gib=float(reserved))
        records.append(rec)
    return records


def steady_state(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the logged intervals after the first (compiles, cuDNN autotuning)."""
    steady = records[1:] or records
    out: dict[str, Any] = {"intervals": len(steady), "last_step": records[-1]["step"]}
    for key in ("samples_per_s_per_gpu", "data_wait", "mfu", "tflops_per_gpu"):
        values = [r[key] for r in steady if r.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 4)
    mem = [r[k] for r in records for k in ("max_memory_allocated_gib",) if r.get(k) is not None]
    if mem:
        out["peak_allocated_gib"] = round(max(mem), 2)
    return out


def _gpu_memory_used_mib() -> float | None:
    text = _nvidia_smi("memory.used").split("\n")[0].replace("MiB", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def run_trainer(res: Result, name: str, run_s: float, extra_env: dict[str, str] | None = None) -> tuple[str, dict]:
    """Run TRAIN_COMMANDS[name] for at most `run_s` s of wall time (then SIGKILL: nothing
    to save), sampling the GPU's used memory; returns (console output, steady state)."""
    from gpu_check import trainer_argv

    paths = load_shards()
    logs = work_dir() / f"logs_{name}"
    argv = [sys.executable, "-m", "clip_fast.train", *trainer_argv(name, {**paths, "logs": str(logs)})]
    res.save(command=" ".join(argv[1:]))
    log_path = work_dir() / f"{name}.trainer.log"
    peak_used, t0 = 0.0, time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=work_dir(),
                                env={**os.environ, **(extra_env or {})}, preexec_fn=os.setpgrp)
        while proc.poll() is None and time.monotonic() - t0 < run_s:
            peak_used = max(peak_used, _gpu_memory_used_mib() or 0.0)
            time.sleep(1.0)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()
    console = log_path.read_text(errors="replace")
    records = parse_step_records(logs, console)
    state = {**(steady_state(records) if records else {}), "wall_s": round(time.monotonic() - t0, 1),
             "gpu_memory_used_peak_gib": round(peak_used / 1024, 2), "exit_code": proc.returncode}
    res.save(**state)
    if not records and name not in ("sync_debug", "graph_breaks"):
        raise Failed(f"no logged step in {state['wall_s']} s; trainer output tail: {console[-800:]}")
    return console, state


def _train_item(res: Result, name: str) -> None:
    require_cuda()
    _, s = run_trainer(res, name, run_s=TRAIN_RUN_S)
    mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a"
    res.save("pass", f"{s.get('samples_per_s_per_gpu', 0):.0f} samples/s/gpu, MFU {mfu}, data-wait "
                     f"{100 * s.get('data_wait', 0):.0f}%, peak {s.get('peak_allocated_gib', '?')} GiB allocated "
                     f"({s['gpu_memory_used_peak_gib']} GiB used on the device), {s['intervals']} intervals to step "
                     f"{s['last_step']}")


def item_train_amp_bf16(res: Result) -> None:
    _train_item(res, "train_amp_bf16")


def item_train_bf16_sr(res: Result) -> None:
    _train_item(res, "train_bf16_sr")


def _trainer_reads(text: str) -> bool:
    """Whether the installed trainer's source mentions `text` (an env var it honours)."""
    import clip_fast.train as train

    root = Path(train.__file__).parent
    files = [Path(train.__file__)] if Path(train.__file__).name != "__init__.py" else list(root.glob("*.py"))
    return any(text in f.read_text(errors="replace") for f in files)


_SYNC_WARNING = re.compile(r"^(.*?:\d+): UserWarning: called a synchronizing CUDA operation", re.M)


def item_sync_debug(res: Result) -> None:
    require_cuda()
    if not _trainer_reads("CLIP_FAST_SYNC_DEBUG"):
        raise Skip("the trainer does not read CLIP_FAST_SYNC_DEBUG yet")
    console, state = run_trainer(res, "sync_debug", run_s=item_timeout_s() - 8,
                                 extra_env={"CLIP_FAST_SYNC_DEBUG": "10:30", "PYTHONWARNINGS": "always::UserWarning"})
    sites = _SYNC_WARNING.findall(console)
    counts = {site: sites.count(site) for site in dict.fromkeys(sites)}
    res.save(warnings=len(sites), sites=counts)
    if state.get("last_step", 0) < 30:
        raise Failed(f"the run stopped at step {state.get('last_step')} before step 30; tail: {console[-600:]}")
    res.save("pass", f"{len(sites)} synchronizing-operation warnings in steps 10-30 from {len(counts)} sites "
                     "(the step-20 logging interval syncs by design)")


def item_graph_breaks(res: Result) -> None:
    require_cuda()
    console, state = run_trainer(res, "graph_breaks", run_s=item_timeout_s() - 8,
                                 extra_env={"TORCH_LOGS": "graph_breaks"})
    lines = [ln.strip() for ln in console.splitlines() if "Graph break" in ln or "graph break" in ln]
    reasons = list(dict.fromkeys(lines))
    res.save(graph_break_lines=len(lines), distinct=reasons[:20])
    if not state.get("last_step"):
        raise Failed(f"the --torchcompile run logged no step (exit {state.get('exit_code')}); tail: {console[-600:]}")
    res.save("pass", f"{len(lines)} graph-break log lines, {len(reasons)} distinct, over {state['last_step']} "
                     f"compiled steps")


def item_accum_32k(res: Result) -> None:
    require_cuda()
    from gpu_check import check_trainer_command, trainer_argv

    problem = check_trainer_command(trainer_argv("accum_32k", load_shards()))
    if problem is not None:
        raise Skip(f"the trainer does not accept the command yet: {problem}")
    _, s = run_trainer(res, "accum_32k", run_s=item_timeout_s() - 8)
    res.save("pass", f"one step of global batch 32,768 (first step: includes warm-up): "
                     f"{s.get('samples_per_s_per_gpu', 0):.0f} samples/s/gpu, peak "
                     f"{s.get('peak_allocated_gib', '?')} GiB allocated ({s['gpu_memory_used_peak_gib']} GiB used)")


# ------------------------------------------------------------------------------ sanitizer, devices


def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, in CUDA_HOME, in an Nsight folder, or in a pip CUDA package."""
    candidates = (shutil.which("compute-sanitizer"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer"),
                  *sorted(glob.glob("/opt/nvidia/*/compute-sanitizer/compute-sanitizer")),
                  *sorted(glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "*", "bin",
                                                 "compute-sanitizer"))))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _sanitize(res: Result, tool: str) -> None:
    require_cuda()
    exe = find_sanitizer()
    if exe is None:
        raise Skip("unavailable: compute-sanitizer not found")
    argv = [exe, "--tool", tool, "--error-exitcode", "3", "--print-limit", "20", sys.executable,
            str(BENCH_DIR / "gpu_sanitize_driver.py")]
    res.save(command=" ".join(argv))
    log = work_dir() / f"sanitize_{tool}.log"
    code = run_logged(argv, log, item_timeout_s() - 5, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    text = log.read_text(errors="replace")
    if "Device not supported" in text or "device not supported" in text:
        raise Skip("unavailable: compute-sanitizer refused the device (gVisor runtime?)")
    done = re.findall(r"^launched (\S+)", text, re.M)
    errors = re.search(r"ERROR SUMMARY: (\d+) error", text)
    res.save(launchers_run=done, errors=int(errors.group(1)) if errors else None, exit_code=code)
    if code is None:
        raise Failed(f"timed out after {len(done)} launchers")
    if code != 0 or not errors or int(errors.group(1)):
        raise Failed(f"{tool}: exit {code}, {errors.group(0) if errors else 'no error summary'}; tail: {text[-800:]}")
    res.save("pass", f"{tool}: 0 errors over {len(done)} launches")


def item_sanitize_memcheck(res: Result) -> None:
    _sanitize(res, "memcheck")


def item_sanitize_initcheck(res: Result) -> None:
    _sanitize(res, "initcheck")


def item_multi_gpu(res: Result) -> None:
    from gpu_check import gpu_count

    gpus = gpu_count()  # from nvidia-smi, without importing torch: ~1 s when skipped
    if gpus < 2:
        raise Skip(f"skipped: {gpus} GPU")
    argv = [sys.executable, str(BENCH_DIR / "gpu_sanitize_driver.py"), "--device-guard"]
    log = work_dir() / "multi_gpu.log"
    code = run_logged(argv, log, item_timeout_s() - 5)
    text = log.read_text(errors="replace")
    mismatches = re.findall(r"^MISMATCH (.*)$", text, re.M)
    res.save(exit_code=code, mismatches=mismatches)
    if code != 0 or mismatches:
        raise Failed(f"tensors on cuda:1 with cuda:0 current: exit {code}, {len(mismatches)} mismatches; "
                     f"tail: {text[-600:]}")
    res.save("pass", "every launcher gave the same result on cuda:1 with cuda:0 current")


ITEMS: dict[str, Callable[[Result], None]] = {
    "install": item_install, "env": item_env, "gpu_tests": item_gpu_tests, "contrastive": item_contrastive,
    "siglip": item_siglip, "towers": item_towers, "adamw": item_adamw, "shards": item_shards, "data": item_data,
    "train_amp_bf16": item_train_amp_bf16, "train_bf16_sr": item_train_bf16_sr, "openclip_step": item_openclip_step,
    "sharded_shape": item_sharded_shape, "sanitize_memcheck": item_sanitize_memcheck,
    "sanitize_initcheck": item_sanitize_initcheck, "sync_debug": item_sync_debug, "graph_breaks": item_graph_breaks,
    "multi_gpu": item_multi_gpu, "accum_32k": item_accum_32k,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ITEMS:
        print(f"usage: gpu_items.py ITEM, ITEM one of {', '.join(ITEMS)}", file=sys.stderr)
        return 2
    res = Result(os.environ.get("GPU_CHECK_RESULT"), f"gpu_items.py {argv[0]}")
    try:
        ITEMS[argv[0]](res)
    except Skip as exc:
        res.save("skipped", str(exc))
    except Failed as exc:
        res.save("fail", str(exc))
        return 1
    except Exception as exc:  # an item's crash is reported, the run goes on
        import traceback

        traceback.print_exc()
        res.save("error", f"{type(exc).__name__}: {exc}")
        return 1
    if res.doc["status"] is None:
        res.save("error", "the item ended without a verdict")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
