"""Benchmark: how many full-recipe CIFAR-10 ResNet-9s one GPU trains per hour, stacked vs one model at a time.

What is timed, and what is extrapolated (the output says the same):

* **stacked** — ``raybench.training.train_stack`` itself (the code every raybench unit runs: per-model data order,
  the triangular schedule, fused SGD, bf16 autocast, channels-last grouped convolutions) on a stack of M
  ResNet-9s, for ``--steps`` optimiser steps of batch 256 per model after ``--warmup`` untimed steps. Data is
  random (timings do not depend on pixel values) and resident on the GPU, as in a raybench worker.
* **loop** — one plain ``resnet9()`` (channels-last) trained the way data-unlearning-bench trains: one model at a
  time, SGD, autocast (``--loop-precision``: bf16, or fp16 with a GradScaler as DUB does), batches gathered from
  GPU-resident data (DUB streams from an ffcv loader, so this is the loop's best case).
* **extrapolation** — the full recipe is 24 epochs × 196 steps = 4,704 steps per model; the step time is taken
  as constant (the last, partial batch of each epoch is counted as a full one, so this errs slow by <1%). One
  margin pass over 60,000 samples per model (train + val, as a raybench unit stores them) is timed and added.
* **FLOP/s** — counted analytically: conv + head multiply-accumulates of one forward pass
  (``raybench.models.resnet9.resnet9_macs``: 291.3 M per 32×32 image) × 2 FLOP × 3 (forward, input gradient,
  weight gradient), against ``--peak-tflops`` (default: H100 SXM dense bf16, 989 TFLOP/s; an H200 has the same
  tensor cores). BatchNorm, ReLU, pooling and the optimiser are not counted (they are memory-bound).

Measured (one H100 80GB HBM3, torch 2.11.0+cu130, 200 timed steps after 20-30 warm-up steps, 2026-11-23):

    cuDNN benchmark   kind                 M   step ms  s/model  models/h  TFLOP/s  of 989
    off               stacked              8     35.57    21.13     170.4    100.6   10.2%
    off               stacked             16     71.86    21.34     168.7     99.6   10.1%
    off               stacked             32    142.93    21.23     169.6    100.2   10.1%
    off               stacked             64    280.20    20.82     172.9    102.2   10.3%
    off               loop (bf16)          1      3.58    16.82     214.0    125.1   12.7%
    on                stacked             16     41.35    12.33     291.9    173.1   17.5%

So stacking buys nothing on this GPU for this model (a batch of 256 ResNet-9 images already fills it; the time per
model is flat in M), cuDNN's benchmark mode buys 1.7× (``raybench.training`` now turns it on for resnet9), and the
best measured setting trains 2,000 models in about 6.9 GPU-hours at 17.5% of the datasheet peak (22% of the
~800 TFLOP/s a large bf16 GEMM reaches on this machine). The ``on`` rows for M=32 and the loop were not reached
within the device time of that session.

    python bench/train_throughput.py                           # M = 8, 16, 32 and the loop, on CUDA
    python bench/train_throughput.py --ms 1,8,16,32,64 --steps 300 --json out.json
    python bench/train_throughput.py --device cpu --ms 2 --steps 3 --warmup 1 --hw 16 --batch 32   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from throughput_common import (
    N_TRAIN,
    N_VAL,
    RECIPE,
    LoopTrainer,
    extrapolate,
    random_data,
    steps_per_model,
    time_margins,
    time_train_stack,
    timed,
)
from throughput_common import (
    flops_per_sample as count_flops_per_sample,
)

from raybench.models import build_stack
from raybench.models.resnet9 import StackedResNet9


def bench_stack(m: int, args: argparse.Namespace, device: torch.device, flops_per_sample: float) -> dict:
    stack = build_stack("resnet9", list(range(m)), (3, args.hw, args.hw), 10).to(device)
    x, y = random_data(args.steps * args.batch, args.hw, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = time_train_stack(stack, x, y, args.batch, args.warmup, device)
    n_eval = min(args.eval_samples, len(y))
    margins_s = time_margins(stack, x[:n_eval], y[:n_eval], device) * (N_TRAIN + N_VAL) / n_eval / m
    row = {"kind": "stacked", "M": m, "margins_s_per_model": margins_s,
           **extrapolate(step_s, margins_s, m, flops_per_sample * args.batch * m, args.peak_tflops * 1e12,
                         args.steps_per_model)}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def bench_loop(args: argparse.Namespace, device: torch.device, flops_per_sample: float) -> dict:
    x, y = random_data(args.steps * args.batch, args.hw, device)
    loop = LoopTrainer(x, y, args.batch, device, precision=args.loop_precision)
    loop.run(args.warmup)
    step_s = timed(lambda: loop.run(args.steps), device) / args.steps
    return {"kind": f"loop ({args.loop_precision} autocast)", "M": 1, "margins_s_per_model": 0.0,
            **extrapolate(step_s, 0.0, 1, flops_per_sample * args.batch, args.peak_tflops * 1e12,
                          args.steps_per_model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ms", default="8,16,32", help="stack sizes to time (comma-separated)")
    parser.add_argument("--steps", type=int, default=200, help="timed optimiser steps per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (cuDNN, allocator)")
    parser.add_argument("--batch", type=int, default=RECIPE.batch_size)
    parser.add_argument("--hw", type=int, default=32, help="image side (32 for CIFAR-10)")
    parser.add_argument("--eval-samples", type=int, default=20_000, help="samples timed for the margin pass")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak (H100 SXM: 989; measured 8k bf16 GEMM here: ~800)")
    parser.add_argument("--loop-precision", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--no-loop", action="store_true", help="skip the one-model-at-a-time baseline")
    parser.add_argument("--cudnn-benchmark", choices=("auto", "on", "off"), default="auto",
                        help="auto: as raybench runs (train_stack turns cuDNN benchmark mode on for resnet9; the loop "
                             "leaves it off, as DUB does); on: on for both; off: off for both")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    if args.cudnn_benchmark == "off":
        StackedResNet9.cuda_cudnn_benchmark = False  # this process only: train_stack then leaves cuDNN as it is
    args.steps_per_model = steps_per_model(args.batch)
    flops_per_sample = count_flops_per_sample(args.hw)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; cudnn benchmark mode: {args.cudnn_benchmark}")
    print(f"recipe: {RECIPE.epochs} epochs x {args.steps_per_model // RECIPE.epochs} steps of batch {args.batch} = "
          f"{args.steps_per_model} steps/model, extrapolated from {args.steps} timed steps after {args.warmup} "
          f"warm-up steps; + one margin pass over {N_TRAIN + N_VAL} samples per model")
    print(f"FLOPs: {flops_per_sample / 1e9:.3f} GFLOP per {args.hw}x{args.hw} sample per training step "
          f"(conv+head MACs x 2 x 3); peak assumed {args.peak_tflops:.0f} TFLOP/s dense bf16")
    rows = []
    for m in (int(v) for v in args.ms.split(",") if v.strip()):
        try:
            rows.append(bench_stack(m, args, device, flops_per_sample))
        except torch.OutOfMemoryError:
            print(f"M={m}: out of memory, skipped")
            torch.cuda.empty_cache()
            continue
        print(json.dumps(rows[-1]), flush=True)
    if not args.no_loop:
        rows.append(bench_loop(args, device, flops_per_sample))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'kind':<22} {'M':>3} {'step ms':>8} {'s/model':>8} {'models/h':>9} {'TFLOP/s':>8} {'of peak':>8} "
          f"{'GPU-h/2000':>10}")
    for r in rows:
        print(f"{r['kind']:<22} {r['M']:>3} {r['step_ms']:>8.2f} {r['s_per_model']:>8.2f} "
              f"{r['models_per_hour']:>9.1f} {r['train_tflops']:>8.1f} {100 * r['fraction_of_peak']:>7.1f}% "
              f"{r['gpu_hours_per_2000']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
