"""Training and inference speed and peak memory of every registered model, against the machine's bounds.

    python benchmarks/run.py                                   # every model, batch 32 and 128
    python benchmarks/run.py --quick                           # batch 32, fewer repeats
    python benchmarks/run.py --models capsnet_mnist --reference-routing
    python benchmarks/run.py --models capsnet_mnist --precisions fp32,bf16   # + bf16 autocast rows

For each model, mode (train: forward + backward + Adam step with the model's natural
loss; infer: forward under no_grad) and batch size, one fresh worker process measures
images/s (median of the repeats after warm-up) and peak memory, then the bound of the
same mode right after it in the same process, which gives the ratio. The bounds: the
PrimaryCaps convolution alone (256 -> 256 channels, 9x9, stride 2, on (N, 256, 20, 20);
forward + backward for training, forward under no_grad for inference) and the fp32
GEMM peak. The input pipeline (uint8 decode, random shift, batching) is measured too;
it must keep up with training at 10x.

``--precisions`` (default: fp32, plus bf16 on a CPU with bf16 units) measures every model
also under ``torch.autocast(dtype=torch.bfloat16)``, as ``amp="bf16"`` trains; its ratios
divide by the **fp32** bounds (measured right after, in the same process), and the bf16
PrimaryCaps convolution is reported beside the fp32 bounds for reference. The JSON and the
table name the CPU's bf16 unit (``capsnet.precision.cpu_bf16_units``).

``--reference-routing`` adds, for every model with a ``DenseCaps`` layer, a row with the
unfused routing (einsum votes, autograd through Procedure 1): before/after in one run.

Writes ``benchmarks/results/<date>-<host>.json`` and the generated section of
``docs/performance.md``. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch

import capsnet
from capsnet.precision import cpu_bf16_units, resolve_amp

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_bench.py"
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
DATA_FACTOR = 10  # the input pipeline must be this many times faster than training
PRECISIONS = ("fp32", "bf16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="model names (default: every registered model); commas allowed")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 32,128; --quick: 32)")
    p.add_argument("--modes", default="train,infer", help="comma-separated: train, infer")
    p.add_argument("--quick", action="store_true", help="batch 32 only, 1 warm-up step, 3 repeats")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, --quick 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every worker")
    p.add_argument("--malloc", choices=("keep", "compact", "system"), default="keep",
                   help="the workers' malloc policy (capsnet.allocator, as CAPSNET_MALLOC names them): keep "
                        "(default, as the CLI does), compact, system (glibc's defaults)")
    p.add_argument("--system-malloc", action="store_const", dest="malloc", const="system", help="the same as --malloc system")
    p.add_argument("--reference-routing", action="store_true", help="also time DenseCaps models with the unfused routing")
    p.add_argument("--precisions", default=None,
                   help="comma-separated: fp32, bf16 (default: fp32, and bf16 too on a CPU with bf16 units)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--no-doc", action="store_true", help="write the JSON only")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_list = [int(b) for b in (args.batches or ("32" if args.quick else "32,128")).split(",")]
    args.mode_list = [m for m in args.modes.split(",") if m]
    default = "fp32,bf16" if args.device == "cpu" and cpu_bf16_units() else "fp32"
    args.precision_list = [m for m in (args.precisions or default).split(",") if m]
    if set(args.precision_list) - set(PRECISIONS) or "fp32" not in args.precision_list:
        p.error(f"--precisions takes fp32 (always: the bounds are fp32) and optionally bf16, got {args.precisions!r}")
    if set(args.mode_list) - {"train", "infer"}:
        p.error(f"--modes takes train and/or infer, got {args.modes!r}")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    registered = capsnet.list_models()
    names = [n for item in (args.models or registered) for n in item.split(",") if n]
    unknown = sorted(set(names) - set(registered))
    if unknown:
        p.error(f"unknown models {unknown}; registered: {registered}")
    args.model_list = names
    return args


# --------------------------------------------------------------------------- workers


def run_worker(spec: dict, timeout: float) -> dict:
    """One measurement in a fresh process (so ``ru_maxrss`` is this measurement's peak)."""
    cmd = [sys.executable, str(WORKER.parent / "run.py"), "--worker", json.dumps(spec)]
    label = " ".join(f"{k}={v}" for k, v in spec.items() if k in ("kind", "model", "mode", "batch", "precision", "reference_routing"))
    print(f"  {label} ...", end="", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        print(" timed out", flush=True)
        return {"spec": spec, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f" failed: {tail[0]}", flush=True)
        return {"spec": spec, "error": tail[0]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shown = f"{result['images_per_s']:.1f} img/s" if "images_per_s" in result else f"{result.get('gflops', 0):.1f} GFLOP/s"
    print(f" {shown}", flush=True)
    return {"spec": spec, **result}


def has_dense_caps(name: str) -> bool:
    from capsnet.layers import DenseCaps

    with torch.device("meta"):
        model = capsnet.create_model(name)
    return any(isinstance(m, DenseCaps) for m in model.modules())


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(args) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "capsnet": capsnet.__version__,
        "python": platform.python_version(),
        "threads": args.threads or torch.get_num_threads(),
        "device": args.device,
        "cpu_bf16_units": cpu_bf16_units(),  # amx_bf16, avx512_bf16 or None (bf16 emulated)
        "amp_auto": resolve_amp("auto", args.device) or "fp32",
        "command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "loadavg_start": os.getloadavg()[0],
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE") if k in os.environ},
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


# --------------------------------------------------------------------------- run


def run(args) -> dict:
    common = dict(device=args.device, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                  malloc=args.malloc)  # fmt: skip
    report = {"machine": machine(args), "settings": {**common, "batches": args.batch_list}, "bounds": [], "models": [], "data": []}
    print(f"capsnet benchmark on {report['machine']['cpu']}, torch {torch.__version__}, {report['machine']['threads']} threads")
    report["gemm"] = run_worker({"kind": "gemm", **common}, args.timeout)
    variants = [(name, False) for name in args.model_list]
    if args.reference_routing:
        variants += [(name, True) for name in args.model_list if has_dense_caps(name)]
    for batch in args.batch_list:
        for precision in args.precision_list:
            for mode in args.mode_list:
                spec = {"kind": "bound", "mode": mode, "batch": batch, "precision": precision, **common}
                report["bounds"].append(run_worker(spec, args.timeout))
        report["data"].append(run_worker({"kind": "data", "batch": batch, **common}, args.timeout))
        for name, reference in variants:
            for precision in args.precision_list:
                for mode in args.mode_list:
                    spec = {"kind": "model", "model": name, "mode": mode, "batch": batch, "precision": precision, **common}
                    if reference:
                        spec["reference_routing"] = True
                    report["models"].append(run_worker(spec, args.timeout))
    report["machine"]["loadavg_end"] = os.getloadavg()[0]
    summarise(report)
    return report


def summarise(report: dict) -> None:
    """Data-loading margins: pipeline images/s over each model's training images/s."""
    data = {r["spec"]["batch"]: r for r in report["data"] if "images_per_s" in r}
    for row in report["models"]:
        batch = row["spec"]["batch"]
        if row["spec"]["mode"] == "train" and "images_per_s" in row and batch in data:
            row["data_over_train"] = data[batch]["images_per_s"] / row["images_per_s"]
    margins = [r["data_over_train"] for r in report["models"] if "data_over_train" in r]
    report["data_margin_min"] = min(margins) if margins else None
    report["data_keeps_up"] = bool(margins) and min(margins) >= DATA_FACTOR


# --------------------------------------------------------------------------- report


def _fmt(x, spec=".1f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        BEGIN,
        "<!-- Generated by benchmarks/run.py; edits between these markers are overwritten. -->",
        "",
        f"Command: `{m['command']}`",
        "",
        "| | |",
        "| --- | --- |",
        f"| date | {m['date']} |",
        f"| host | {m['host']} |",
        f"| CPU | {m['cpu']} ({m['logical_cpus']} logical CPUs) |",
    ]
    if "gpu" in m:
        lines.append(f"| GPU | {m['gpu']} |")
    lines += [
        f"| torch | {m['torch']} (capsnet {m['capsnet']}, Python {m['python']}) |",
        f"| threads | {m['threads']} |",
        f"| device | {m['device']} |",
        f"| CPU bf16 unit | {m.get('cpu_bf16_units') or 'none (bf16 emulated)'}; `amp=\"auto\"` runs {m.get('amp_auto', 'fp32')} |",
        f"| load average (1 min) at start / end | {m['loadavg_start']:.2f} / {m['loadavg_end']:.2f} |",
        f"| warm-up steps / timed repeats | {report['settings']['warmup']} / {report['settings']['repeats']} |",
        f"| malloc | {report['settings'].get('malloc', 'system')} (`keep`/`kept`: `capsnet.allocator.keep_freed_memory()`, as `capsnet train`; `compact`: `compact_memory()`) |",
    ]
    if m["env"]:
        lines.append(f"| environment | {', '.join(f'{k}={v}' for k, v in m['env'].items())} |")
    gemm = report.get("gemm", {})
    lines += ["", f"fp32 GEMM peak ({gemm.get('size', '?')}² matmul): {_fmt(gemm.get('gflops'))} GFLOP/s median, "
              f"{_fmt(gemm.get('gflops_best'))} best.", ""]  # fmt: skip
    lines += [
        "Bounds (PrimaryCaps convolution alone, `nn.Conv2d`; train = forward + backward incl. the input gradient, infer = "
        "forward, no_grad; every ratio below divides by the fp32 bound, bf16 is shown for reference):",
        "",
        "| batch | mode | precision | images/s | GFLOP/s | of fp32 GEMM peak | peak memory (MB) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for b in report["bounds"]:
        precision = b["spec"].get("precision", "fp32")
        if "images_per_s" not in b:
            lines.append(f"| {b['spec']['batch']} | {b['spec']['mode']} | {precision} | error: {b.get('error')} | | | |")
            continue
        share = b["gflops"] / gemm["gflops"] if gemm.get("gflops") else None
        lines.append(
            f"| {b['spec']['batch']} | {b['spec']['mode']} | {precision} | {b['images_per_s']:.1f} | {b['gflops']:.1f} | {_fmt(share, '.2f')} "
            f"| {b['peak_memory_mb']:.0f} |"
        )
    mem = "peak GPU memory allocated (MB)" if m["device"].startswith("cuda") else "peak RSS (MB)"
    lines += [
        "",
        "Models (ratio: images/s over the fp32 bound of the same mode and batch, measured right after in the same worker process;"
        " in brackets the same ratio in CPU time, `time.process_time`, which a loaded machine does not inflate at one thread):",
        "",
        f"| model | precision | batch | train images/s | train / conv bound | infer images/s | infer / forward bound | {mem} train | {mem} infer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows: dict[tuple, dict] = {}
    for r in report["models"]:
        s = r["spec"]
        name = s["model"] + (" (reference routing)" if s.get("reference_routing") else "")
        precision = s.get("precision", "fp32")
        rows.setdefault((s["batch"], name, PRECISIONS.index(precision)), {})[s["mode"]] = r
    for (batch, name, precision), modes in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        cells = []
        for mode in ("train", "infer"):
            r = modes.get(mode, {})
            if "error" in r:
                cells.append((f"error: {r['error'][:60]}", "", ""))
            else:
                ratio = _fmt(r.get("ratio_to_bound"), ".2f")
                if "cpu_ratio_to_bound" in r:
                    ratio += f" ({r['cpu_ratio_to_bound']:.2f})"
                cells.append((_fmt(r.get("images_per_s")), ratio, _fmt(r.get("peak_memory_mb"), ".0f")))
        (ti, tr, tm), (ii, ir, im) = cells
        lines.append(f"| {name} | {PRECISIONS[precision]} | {batch} | {ti} | {tr} | {ii} | {ir} | {tm} | {im} |")
    lines += ["", "Input pipeline (uint8 decode, random shift of up to 2 px, batching from an in-memory tensor):", ""]
    lines += ["| batch | images/s | slowest model's margin (pipeline / training images/s) |", "| ---: | ---: | ---: |"]
    for d in report["data"]:
        if "images_per_s" not in d:
            continue
        margins = [r["data_over_train"] for r in report["models"] if r["spec"]["batch"] == d["spec"]["batch"] and "data_over_train" in r]
        lines.append(f"| {d['spec']['batch']} | {d['images_per_s']:.0f} | {_fmt(min(margins) if margins else None, '.0f')}x |")
    verdict = "yes" if report["data_keeps_up"] else "NO"
    lines += ["", f"Input pipeline at least {DATA_FACTOR}x faster than every training run: {verdict}.", "", END]
    return "\n".join(lines)


def write_doc(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Performance\n\n## Latest benchmark run\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(WORKER.parent))
        from _bench import worker_main

        worker_main(args.worker)
        return 0
    report = run(args)
    stamp = datetime.date.today().isoformat()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{stamp}-{socket.gethostname()}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.no_doc:
        write_doc(args.doc, markdown(report))
        print(f"updated {args.doc}")
    ok = all("error" not in r for r in [*report["models"], *report["bounds"], *report["data"], report["gemm"]])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
