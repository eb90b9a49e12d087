"""One-process GPU benchmark of CIFAR-10 ResNet-9 training: environment, achievable peaks, the single-model loop,
the stacked ``raybench.training.train_stack`` path, compiled variants, the margin pass and a kernel-time split.

Sections run in order of value (env, peaks, loop, stacked M=16, compiled loop/stacked, what ``--train-path auto``
chooses at M=16, stacked M=1 and M=32, margins, profiles); before each one the global deadline (``--budget-s``) is
checked against a rough cost estimate and a section that would overrun is skipped with a note. The JSON (``--json``)
is rewritten after every section, so a run cut off by an outer ``timeout`` keeps what it measured. cuDNN benchmark
mode is on throughout; data is random and resident on the device; FLOPs are analytic
(``throughput_common.flops_per_sample``). Per model, the extrapolated cost is 24 epochs × 196 steps plus one margin
pass over 60,000 images (timed at the same M; the loops use the M=1 stack's margin pass, the code raybench runs).

Without CUDA (and no ``--device cpu``) it writes the environment and ``"skipped": "no CUDA device"`` and exits 0.
``--device cpu --smoke`` runs every section with tiny shapes to exercise the code; there the compiled variants use
the ``aot_eager`` backend unless ``--compile-backend inductor`` is given (Inductor's C++ build of one ResNet-9
graph took ~55 s on the 2-core CPU box).

    timeout -k 10 380 python bench/gpu_throughput.py --json gpu.json      # one H100/H200, ~5.5 min
    python bench/gpu_throughput.py --device cpu --smoke --json smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from throughput_common import (
    N_TRAIN,
    N_VAL,
    STACKED,
    LoopTrainer,
    flops_per_sample,
    fused_sgd_supported,
    one_epoch_recipe,
    random_data,
    steps_per_model,
    sync,
    time_margins,
    time_train_stack,
    timed,
)

from raybench.models import build_stack
from raybench.training import Execution, choose_path, train_stack

SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.draw", "power.limit", "power.max_limit", "memory.total", "temperature.gpu")

MARGIN_SAMPLES = N_TRAIN + N_VAL


def nvidia_smi() -> dict | None:
    """The GPU's clocks, power and driver as ``nvidia-smi`` reports them, or None where it is not installed."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    first = out.strip().splitlines()[0] if out.strip() else ""
    return dict(zip(SMI_FIELDS, (v.strip() for v in first.split(",")), strict=False))


def environment(device: torch.device) -> dict:
    """What the figures depend on: GPU model and variant, clocks, power limit, memory, software versions."""
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": platform.processor() or None,
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cuda_available": torch.cuda.is_available(), "device": str(device), "c_compiler": shutil.which("gcc")
           or shutil.which("cc")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
                    "sm_count": props.multi_processor_count, "memory_gib": props.total_memory / 2**30})
        smi = nvidia_smi()
        env["nvidia_smi"] = smi
        env["driver"] = (smi or {}).get("driver_version")
        env["variant"] = gpu_variant(props.name, (smi or {}).get("power.limit"))
    return env


def gpu_variant(name: str, power_limit: str | None) -> str:
    """PCIe / NVL parts say so in their name; an SXM part does not, but its power limit (700 W for H100/H200
    SXM) gives it away. The datasheet bf16 peak differs by variant (SXM 989, PCIe 756 TFLOP/s dense)."""
    for tag in ("PCIe", "NVL"):
        if tag.lower() in name.lower():
            return tag
    try:
        watts = float(power_limit) if power_limit is not None else None
    except ValueError:
        watts = None
    if watts is None:
        return "unknown (no power limit read)"
    return f"SXM (power limit {watts:.0f} W)" if watts >= 600 else f"unknown (power limit {watts:.0f} W)"


def peaks(args: argparse.Namespace, device: torch.device) -> dict:
    """What this GPU reaches on the easiest work: a large bf16 GEMM and a device-to-device copy."""
    n = args.gemm_n
    mats = [torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(3)]

    def gemms(k: int) -> None:
        for _ in range(k):
            torch.matmul(mats[0], mats[1], out=mats[2])

    gemms(args.peak_warmup)
    gemm_s = timed(lambda: gemms(args.peak_iters), device) / args.peak_iters
    out = {"gemm_n": n, "gemm_dtype": "bfloat16", "gemm_iters": args.peak_iters, "gemm_ms": 1e3 * gemm_s,
           "gemm_tflops": 2 * n**3 / gemm_s / 1e12}
    if device.type == "cuda":  # clocks and power while ~1 s of GEMMs is queued, not at idle
        gemms(min(1000, max(1, math.ceil(1.0 / gemm_s))))
        out["nvidia_smi_under_gemm"] = nvidia_smi()
        torch.cuda.synchronize(device)
    mats.clear()  # free 3 × n² bf16 before the copy buffers
    src = torch.empty(args.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copies(k: int) -> None:
        for _ in range(k):
            dst.copy_(src)

    copies(args.peak_warmup)
    copy_s = timed(lambda: copies(args.peak_iters), device) / args.peak_iters
    out.update({"copy_bytes": args.copy_bytes, "copy_ms": 1e3 * copy_s,
                "copy_gbps_read_plus_write": 2 * args.copy_bytes / copy_s / 1e9})
    return out


def training_row(kind: str, m: int, step_s: float, args: argparse.Namespace, extra: dict | None = None) -> dict:
    return {"kind": kind, "M": m, "step_ms": 1e3 * step_s, "timed_steps": args.steps, "warmup_steps": args.warmup,
            **(extra or {})}


def loop_section(args: argparse.Namespace, device: torch.device, compile_mode: str | None = None) -> dict:
    """The published one-model-at-a-time loop (``throughput_common.LoopTrainer``), eager or compiled."""
    x, y = random_data(args.steps * args.batch, args.hw, device)
    fused = fused_sgd_supported(device)
    loop = LoopTrainer(x, y, args.batch, device, fused=fused, compile_mode=compile_mode,
                       compile_backend=args.compile_backend)
    extra = {"fused_sgd": fused, "precision": "bf16 autocast" if device.type == "cuda" else "float32",
             "channels_last": device.type == "cuda"}
    if compile_mode is not None:
        extra.update({"compile_mode": compile_mode, "compile_backend": args.compile_backend,
                      "first_step_s": timed(lambda: loop.run(1), device)})
    loop.run(args.warmup)
    step_s = timed(lambda: loop.run(args.steps), device) / args.steps
    if compile_mode is not None:
        extra["compile_s"] = max(0.0, extra["first_step_s"] - step_s)
    return training_row("loop (compiled)" if compile_mode else "loop", 1, step_s, args, extra)


def stacked_section(m: int, args: argparse.Namespace, device: torch.device, stacks: dict,
                    compiled: bool = False) -> dict:
    """``raybench.training.train_stack`` on ``build_stack("resnet9", …)`` of M models; ``compiled``: as a run
    with ``--compile`` trains (``Execution(compile=True)``: the loss and forward through ``torch.compile``, the
    backward through AOTAutograd), its warm-up's compilation reported as ``compile_s``."""
    stack = build_stack("resnet9", list(range(m)), (3, args.hw, args.hw), 10).to(device)
    x, y = random_data(args.steps * args.batch, args.hw, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    extra: dict = {}
    execution = Execution(path="stacked", compile=compiled, compile_backend=args.compile_backend)
    stats: dict = {}
    step_s = time_train_stack(stack, x, y, args.batch, max(1, args.warmup), device, execution, stats)
    if compiled:
        extra.update({"compile_mode": "default", "compile_backend": args.compile_backend,
                      "compile_s": stats["compile_s"]})
    else:
        stacks[m] = stack  # kept for the margin pass and the profile
    if device.type == "cuda":
        extra["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return training_row("stacked (compiled)" if compiled else "stacked", m, step_s, args, extra)


def auto_choice_section(m: int, args: argparse.Namespace, device: torch.device) -> dict:
    """What a run's ``--train-path auto`` picks for a block of M ResNet-9s here (``training.choose_path``: a few
    steps of the stacked and the per-model path on throwaway copies), with the times per model-step it compared."""
    stack = build_stack("resnet9", list(range(m)), (3, args.hw, args.hw), 10).to(device)
    x, y = random_data(2 * args.batch, args.hw, device)
    t0 = time.perf_counter()
    choice = choose_path(stack, x, y, one_epoch_recipe(args.batch))
    return {"M": m, **choice, "calibration_s": time.perf_counter() - t0}


def margins_section(args: argparse.Namespace, device: torch.device, stacks: dict) -> dict:
    """``compute_margins`` of each kept stack over ``--margin-samples`` images (60,000 = train + val, what a
    raybench unit stores), scaled to 60,000 where fewer were timed."""
    x, y = random_data(args.margin_samples, args.hw, device, seed=1)
    out = {}
    for m, stack in sorted(stacks.items()):
        pass_s = time_margins(stack, x, y, device)
        out[str(m)] = {"M": m, "samples": args.margin_samples, "pass_s": pass_s,
                       "s_per_model_60k": pass_s * MARGIN_SAMPLES / args.margin_samples / m}
    return out


KERNEL_CATEGORIES: tuple[tuple[str, re.Pattern], ...] = (
    ("optimiser", re.compile(r"sgd|optimizer|multi_tensor|foreach|momentum", re.I)),
    ("batchnorm", re.compile(r"batch_?norm|bn_|welford", re.I)),
    ("convolution", re.compile(r"conv|cudnn|xmma|implicit|wgrad|dgrad|fprop|cutlass|gemm|nchw|nhwc|sm\d\d_", re.I)),
    ("elementwise", re.compile(r"elementwise|relu|threshold|add|mul|clamp|fill|copy|triton_poi", re.I)),
)


def categorise(name: str) -> str:
    """The category of a kernel (CUDA) or an aten op (CPU) by its name; the first matching pattern wins, so
    cuDNN's BatchNorm kernels (``cudnn::bn_…``) count as BatchNorm, not convolution."""
    for category, pattern in KERNEL_CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def profile_section(step: Callable[[], None], device: torch.device) -> dict:
    """Share of device time per kernel category over a few profiled steps: CUDA kernel durations on a GPU, ops'
    self CPU time on the CPU. The top kernels are kept so the categorisation can be checked."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    times: dict[str, float] = {}
    if device.type == "cuda":
        for evt in prof.events():
            if evt.device_type == DeviceType.CUDA:
                times[evt.name] = times.get(evt.name, 0.0) + evt.time_range.elapsed_us()
        source = "CUDA kernel time"
    else:
        for evt in prof.key_averages():
            if evt.device_type == DeviceType.CPU and evt.key.startswith("aten::"):
                times[evt.key] = times.get(evt.key, 0.0) + evt.self_cpu_time_total
        source = "self CPU time of aten ops"
    total = sum(times.values())
    shares = {c: 0.0 for c, _ in KERNEL_CATEGORIES} | {"other": 0.0}
    for name, us in times.items():
        shares[categorise(name)] += us / total if total else 0.0
    top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
    return {"source": source, "total_ms": total / 1e3, "shares": shares,
            "top": [{"name": n[:160], "ms": us / 1e3, "category": categorise(n)} for n, us in top]}


def table(results: dict, args: argparse.Namespace) -> list[dict]:
    """Per configuration: ms per model-step, seconds per full-recipe model (training + one margin pass at the same
    M), models per GPU-hour, GPU-hours per 2,000 models, MFU against the datasheet and the measured GEMM. A
    figure whose input was not measured is None."""
    margins = results.get("margins") or {}
    gemm = (results.get("peaks") or {}).get("gemm_tflops")
    fps = flops_per_sample(args.hw)
    rows = []
    for key, sec in results.items():
        if not isinstance(sec, dict) or "step_ms" not in sec:
            continue
        m, step_s = sec["M"], sec["step_ms"] / 1e3
        margin = (margins.get(str(m)) if isinstance(margins, dict) else None) or {}
        margin_s = margin.get("s_per_model_60k")
        train_s = step_s * steps_per_model(args.batch) / m
        per_model = None if margin_s is None else train_s + margin_s
        tflops = fps * args.batch * m / step_s / 1e12
        rows.append({"section": key, "kind": sec["kind"], "M": m, "ms_per_model_step": 1e3 * step_s / m,
                     "train_s_per_model": train_s, "margin_s_per_model": margin_s, "s_per_model": per_model,
                     "models_per_gpu_hour": None if per_model is None else 3600 / per_model,
                     "gpu_hours_per_2000": None if per_model is None else 2000 * per_model / 3600,
                     "train_tflops": tflops, "mfu_datasheet": tflops / args.peak_tflops,
                     "mfu_measured_gemm": None if gemm is None else tflops / gemm,
                     "compile_s": sec.get("compile_s")})
    return rows


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{'configuration':<22} {'M':>3} {'ms/model-step':>13} {'s/model':>8} {'models/GPU-h':>12} "
          f"{'GPU-h/2000':>10} {'MFU ' + format(args.peak_tflops, '.0f'):>9} {'MFU GEMM':>9} {'compile s':>9}")
    for r in rows:
        print(f"{r['kind']:<22} {r['M']:>3} {fmt(r['ms_per_model_step'], '13.3f')} {fmt(r['s_per_model'], '8.2f')} "
              f"{fmt(r['models_per_gpu_hour'], '12.1f')} {fmt(r['gpu_hours_per_2000'], '10.2f')} "
              f"{fmt(None if r['mfu_datasheet'] is None else 100 * r['mfu_datasheet'], '8.1f')}% "
              f"{fmt(None if r['mfu_measured_gemm'] is None else 100 * r['mfu_measured_gemm'], '8.1f')}% "
              f"{fmt(r['compile_s'], '9.1f')}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default; skipped cleanly without one) or cpu")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes (16x16 images, batch 8, M=2, 2 steps, GEMM 256^3) to exercise every section")
    p.add_argument("--json", default="gpu_throughput.json", help="written after every section")
    p.add_argument("--budget-s", type=float, default=330.0, help="global deadline, checked between sections")
    p.add_argument("--steps", type=int, default=100, help="timed optimiser steps per configuration")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (cuDNN autotuning, allocator)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hw", type=int, default=32, help="image side (32 for CIFAR-10)")
    p.add_argument("--ms", default="1,16,32", help="stack sizes; the first section times the second of them")
    p.add_argument("--margin-samples", type=int, default=MARGIN_SAMPLES, help="images per margin pass timed")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--gemm-n", type=int, default=8192)
    p.add_argument("--copy-bytes", type=int, default=1 << 30)
    p.add_argument("--peak-iters", type=int, default=20)
    p.add_argument("--peak-warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="datasheet dense bf16 peak (H100/H200 SXM: 989; H100 PCIe: 756)")
    p.add_argument("--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
                   help="of the compiled loop; the compiled stack runs as raybench's --compile does (default mode)")
    p.add_argument("--compile-backend", default=None, help="inductor (default; aot_eager in a CPU smoke run)")
    p.add_argument("--skip", default="", help="comma-separated sections not to run (e.g. compiled_loop)")
    args = p.parse_args(argv)
    if args.smoke:
        args.hw, args.batch, args.steps, args.warmup, args.ms = 16, 8, 2, 1, "1,2,3"
        args.margin_samples, args.profile_steps, args.gemm_n = 64, 1, 256
        args.copy_bytes, args.peak_iters, args.peak_warmup = 1 << 20, 2, 1
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke and args.device == "cpu" else "inductor"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    device = torch.device(args.device)
    out: dict = {"script": "bench/gpu_throughput.py", "started_utc": datetime.datetime.now(datetime.UTC).isoformat(),
                 "args": vars(args), "flops_per_image_step": flops_per_sample(args.hw),
                 "steps_per_model": steps_per_model(args.batch), "margin_samples_per_model": MARGIN_SAMPLES}

    def write() -> None:
        out["elapsed_s"] = time.monotonic() - t_start
        out["table"] = table(out.get("sections", {}), args)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)

    if device.type == "cuda" and not torch.cuda.is_available():
        out["environment"] = environment(torch.device("cpu"))
        out["skipped"] = "no CUDA device"
        write()
        print(f"gpu_throughput: no CUDA device, GPU sections skipped; environment written to {args.json}")
        return 0
    torch.backends.cudnn.benchmark = True
    out["environment"] = environment(device)
    out["sections"] = sections = {}
    write()
    env = out["environment"]
    print(f"device: {env.get('gpu', device)} {env.get('variant', '')}; torch {env['torch']}, CUDA {env['cuda']}, "
          f"cuDNN {env['cudnn']}, driver {env.get('driver')}", flush=True)
    m_small, m_mid, m_large = (int(v) for v in args.ms.split(","))
    stacks: dict = {}
    n_steps = args.steps + args.warmup
    compile_est = 240.0 if args.compile_mode != "default" else 90.0
    compile_reason = None
    if device.type == "cpu" and args.compile_backend == "inductor" and env["c_compiler"] is None:
        compile_reason = "no C++ compiler on PATH (torch.compile's Inductor needs one on the CPU)"
    plan: list[tuple[str, float, Callable[[], dict]]] = [
        ("peaks", 10.0, lambda: peaks(args, device)),
        ("loop", 5.0 + 0.005 * n_steps, lambda: loop_section(args, device)),
        (f"stacked_m{m_mid}", 8.0 + 0.045 * n_steps * m_mid / 16, lambda: stacked_section(m_mid, args, device, stacks)),
        ("compiled_loop", compile_est, lambda: loop_section(args, device, args.compile_mode)),
        (f"compiled_stacked_m{m_mid}", compile_est, lambda: stacked_section(m_mid, args, device, stacks, True)),
        (f"auto_choice_m{m_mid}", 5.0 + 0.01 * m_mid, lambda: auto_choice_section(m_mid, args, device)),
        (f"stacked_m{m_small}", 5.0 + 0.005 * n_steps * m_small,
         lambda: stacked_section(m_small, args, device, stacks)),
        (f"stacked_m{m_large}", 8.0 + 0.045 * n_steps * m_large / 16,
         lambda: stacked_section(m_large, args, device, stacks)),
        ("margins", 20.0, lambda: margins_section(args, device, stacks)),
        (f"profile_m{m_mid}", 10.0, lambda: profile_stack(m_mid, args, device, stacks)),
        (f"profile_m{m_small}", 10.0, lambda: profile_stack(m_small, args, device, stacks)),
        ("profile_loop", 10.0, lambda: profile_loop(args, device)),
    ]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    for name, estimate, run in plan:
        left = deadline - time.monotonic()
        if name in skip:
            sections[name] = {"skipped": "--skip"}
        elif name.startswith("compiled") and compile_reason:
            sections[name] = {"skipped": compile_reason}
        elif estimate > left:
            sections[name] = {"skipped": f"budget: ~{estimate:.0f} s estimated, {max(0.0, left):.0f} s left"}
        else:
            t0 = time.monotonic()
            try:
                sections[name] = run()
            except Exception as exc:  # one failing section (OOM, a compiler error) must not lose the others
                sections[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            sections[name]["section_s"] = time.monotonic() - t0
        print(f"[{time.monotonic() - t_start:6.1f} s] {name}: {json.dumps(sections[name])[:300]}", flush=True)
        write()
    out["finished"] = True
    write()
    print_table(out["table"], args)
    choice = sections.get(f"auto_choice_m{m_mid}", {})
    if "path" in choice:
        print(f"\n--train-path auto at M={m_mid}: {choice['path']} (stacked {choice['stacked_ms']:.3f} ms, per-model "
              f"{choice['per_model_ms']:.3f} ms per model-step)")
    print(f"\nJSON: {args.json}")
    return 0


def profile_stack(m: int, args: argparse.Namespace, device: torch.device, stacks: dict) -> dict:
    """Kernel split of ``--profile-steps`` steps of ``train_stack`` on the kept (already warm) stack of M models."""
    if m not in stacks:
        raise RuntimeError(f"no stack of {m} models was trained in this run (its section was skipped or failed)")
    n = args.profile_steps * args.batch
    x, y = random_data(n, args.hw, device, seed=2)
    return {"M": m, "steps": args.profile_steps,
            **profile_section(lambda: train_stack(stacks[m], x, y, one_epoch_recipe(args.batch), execution=STACKED),
                              device)}


def profile_loop(args: argparse.Namespace, device: torch.device) -> dict:
    """Kernel split of ``--profile-steps`` steps of the eager single-model loop, after its own warm-up."""
    x, y = random_data(max(args.profile_steps, args.warmup) * args.batch, args.hw, device, seed=2)
    loop = LoopTrainer(x, y, args.batch, device, fused=fused_sgd_supported(device))
    loop.run(args.warmup)
    return {"M": 1, "steps": args.profile_steps, **profile_section(lambda: loop.run(args.profile_steps), device)}


if __name__ == "__main__":
    sys.exit(main())
