"""bench/results.json -> bench/results.md: one row per figure with its yardstick, the ratio,
the issue's target and whether it is met (and if not, by how much)."""

from __future__ import annotations

from bench.machine import one_line

GPU_NOTE = (
    "not run here: no GPU was lent to this task. On one: `python -m bench.run_all --device cuda "
    "--model vit_b16 --batch 256` (MFU is then also quoted against the H100's 989 TFLOP/s "
    "dense bf16)"
)


def _at_least(value: float, target: float) -> str:
    if value >= target:
        return "met"
    return f"**missed**: {value / target:.0%} of the target (needs {target / value:.2f}x more)"


def _at_most(value: float, target: float) -> str:
    if value <= target:
        return "met"
    return f"**missed**: {value / target:.2f}x over the target"


def _mib(value: float) -> str:
    return f"{value:,.0f} MiB"


def loss_rows(loss: dict) -> list[tuple]:
    rows = []
    for row in loss["committed_rows"]:
        if row["global_batch"] != 32768:
            continue
        naive = row.get("naive_predicted") or row["naive"]
        predicted = " (naive predicted: over the memory budget)" if "naive_predicted" in row else ""
        ratio = row["memory_ratio"]
        rows.append((f"Loss peak memory, global batch 32k, 4 ranks, committed sweep{predicted}",
                     _mib(row["tiled"]["peak_growth_mib"]), _mib(naive["peak_growth_mib"]),
                     f"1/{1 / ratio:.0f}", "<= 1/20", _at_most(ratio, 1 / 20)))
        rows.append(("Loss time (CPU s), global batch 32k, 4 ranks, committed sweep",
                     f"{row['tiled']['cpu_seconds']:.0f} s", f"{naive['cpu_seconds']:.0f} s",
                     f"{row['cpu_time_ratio']:.2f}x", "<= 1.2x", _at_most(row["cpu_time_ratio"], 1.2)))
    for row in loss["fresh_rows"]:
        if "skipped" in row["naive"]:
            continue
        batch = f"{row['global_batch'] // 1024}k"
        rows.append((f"Loss peak memory, global batch {batch}, 4 ranks, this run",
                     _mib(row["tiled"]["peak_growth_mib"]), _mib(row["naive"]["peak_growth_mib"]),
                     f"1/{1 / row['memory_ratio']:.0f}", "(shrinks with batch)", ""))
        rows.append((f"Loss time (CPU s), global batch {batch}, 4 ranks, this run",
                     f"{row['tiled']['cpu_seconds']:.1f} s", f"{row['naive']['cpu_seconds']:.1f} s",
                     f"{row['cpu_time_ratio']:.2f}x", "<= 1.2x", _at_most(row["cpu_time_ratio"], 1.2)))
    return rows


def to_markdown(results: dict) -> str:
    train, loader, ev = results["train"], results["data_loader"], results["eval"]
    peak = results["matmul_peak"]
    flops = results["flops"]
    settings = train["settings"]
    ours_mfu, oc_mfu = train["ours"]["mfu"], train["openclip"]["mfu"]
    # Results from before the bench chose precision from the hardware were all bf16.
    precision = results.get("precision", {}).get("chosen", "bf16")
    peak_key = peak.get("used", "bf16_gflops")
    peak_name = "fp32" if peak_key == "fp32_gflops" else "bf16"
    rows = [
        (f"Training samples/s ({settings['model']}, batch {settings['batch']}, {precision}, "
         f"{settings['workers']} worker, {settings['device']})",
         f"{train['ours']['samples_per_s']:.1f}", f"{train['openclip']['samples_per_s']:.1f} (open_clip_train)",
         f"{train['ratio']:.2f}x", ">= 2x", _at_least(train["ratio"], 2.0)),
        (f"MFU, real tokens ({flops['total'] / 1e9:.2f} GFLOP/sample) vs {peak_name} matmul peak "
         f"{peak[peak_key]:.0f} GFLOP/s",
         f"{ours_mfu:.1%}", f"{oc_mfu:.1%} (open_clip_train)", f"{ours_mfu / oc_mfu:.2f}x",
         ">= 40%", _at_least(ours_mfu, 0.40)),
        (f"Data loader samples/s ({loader['workers']} worker) vs raw JPEG decode",
         f"{loader['ours_samples_per_s']:.0f}", f"{loader['raw_decode_samples_per_s']:.0f} (PIL decode only)",
         f"{loader['ratio_to_raw_decode']:.2f}", ">= 0.90", _at_least(loader["ratio_to_raw_decode"], 0.90)),
        # Since the loader decodes with libjpeg-turbo directly, PIL is no longer the limit.
        *([(f"Data loader samples/s ({loader['workers']} worker) vs libjpeg-turbo decode alone",
            f"{loader['ours_samples_per_s']:.0f}",
            f"{loader['raw_turbo_decode_samples_per_s']:.0f} (simplejpeg decode only)",
            f"{loader['ratio_to_turbo_decode']:.2f}", "(record)", "")]
          if "raw_turbo_decode_samples_per_s" in loader else []),
        ("Data loader samples/s vs OpenCLIP's loader",
         f"{loader['ours_samples_per_s']:.0f}", f"{loader['openclip_samples_per_s']:.0f} (get_wds_dataset)",
         f"{loader['ratio_to_openclip']:.2f}x", "(none)", ""),
        # Issue #17's per-core goal, 224 px from 256-px JPEGs with the augmentation on the CPU.
        ("Data loader samples/s per worker core, augmentation on the CPU (issue #17)",
         f"{loader['ours_samples_per_s']:.0f}", "1200 (goal)", "", ">= 1200",
         _at_least(loader["ours_samples_per_s"], 1200)),
        *([("Data loader, data.augment_on=device: the workers' side vs raw JPEG decode",
            f"{loader['device_path_samples_per_s']:.0f}",
            f"{loader['raw_decode_samples_per_s']:.0f} (PIL decode only)",
            f"{loader['device_path_ratio_to_raw_decode']:.2f}", ">= 0.67 (within 1.5x)",
            _at_least(loader["device_path_ratio_to_raw_decode"], 1 / 1.5))]
          if "device_path_samples_per_s" in loader else []),
        *([("Data loader, data.augment_on=device: the workers' side vs libjpeg-turbo decode alone",
            f"{loader['device_path_samples_per_s']:.0f}",
            f"{loader['raw_turbo_decode_samples_per_s']:.0f} (simplejpeg decode only)",
            f"{loader['device_path_ratio_to_turbo_decode']:.2f}", "(record)", "")]
          if "device_path_ratio_to_turbo_decode" in loader else []),
        (f"Data wait share of training steps, {settings['model']}",
         f"{train['ours']['data_wait_frac']:.1%}", "", "", "not the bottleneck (< 5%)",
         _at_most(train["ours"]["data_wait_frac"], 0.05)),
        ("Data wait share of training steps, tiny_cnn demo model (64 px, batch 128)",
         f"{results['tiny']['data_wait_frac']:.1%}", f"{results['tiny']['samples_per_s']:.0f} samples/s",
         "", "not the bottleneck (< 5%)", _at_most(results["tiny"]["data_wait_frac"], 0.05)),
        *loss_rows(results["loss_memory"]),
        (f"Zero-shot eval images/s (batch {ev['batch']}, {ev.get('precision', 'bf16')})",
         f"{ev['ours_images_per_s']:.0f}", f"{ev['clip_benchmark_images_per_s']:.0f} (CLIP_benchmark)",
         f"{ev['ratio']:.2f}x", ">= 1x", _at_least(ev["ratio"], 1.0)),
        ("GPU: ViT-B/16 samples/s and MFU vs H100 bf16 peak", "", "", "", "record", GPU_NOTE)
        if results["machine"]["device"] != "cuda" else
        ("GPU run", f"{train['ours']['samples_per_s']:.1f} samples/s",
         f"vendor peak {peak['vendor_bf16_gflops'] or 0:.0f} GFLOP/s", "", "record",
         f"MFU vs vendor peak {train['ours']['model_gflops_per_s'] / (peak['vendor_bf16_gflops'] or float('inf')):.1%}"),
    ]
    if "fused_adamw_speedup" in train:
        unfused = train["ours_unfused_adamw"]["samples_per_s"]
        rows.insert(1, ("Speed change: fused AdamW (ours vs ours with optim.fused=false)",
                        f"{train['ours']['samples_per_s']:.1f}", f"{unfused:.1f}",
                        f"{train['fused_adamw_speedup']:.2f}x", "(effect)", ""))
    m = results["machine"]
    lines = [
        "# `make bench` results",
        "",
        "Written by `python -m bench.run_all` (`make bench`); every ratio compares two figures "
        "measured one right after the other in this run." + (
            " **Quick mode: too few steps to quote.**" if results["quick"] else ""),
        "",
        f"Machine: {one_line(m)}; load average {m['load_average_1min']} at start, "
        f"{m.get('load_average_1min_end')} at end (other jobs share the cores, so read ratios, "
        f"not absolutes). Run took {results['seconds'] / 60:.1f} min.",
        "",
        "| figure | ours | yardstick | ratio | target | status |",
        "|---|---:|---:|---:|---|---|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    bf16_readings = ", ".join(f"{p['bf16_gflops']:.0f}" for p in peak["readings"])
    fp32_readings = ", ".join(f"{p['fp32_gflops']:.0f}" for p in peak["readings"])
    lines += [
        "",
        "Notes:",
        f"- Matmul peak ({peak['readings'][0]['size']}^3, best of repeats, start and end of the run; "
        f"the higher is used): bf16 {bf16_readings} GFLOP/s, fp32 {fp32_readings} GFLOP/s.",
        f"- Model FLOPs per training sample (bench/flops.py): image {flops['image'] / 1e9:.2f} G, "
        f"text {flops['text'] / 1e9:.3f} G at the corpus's mean {flops['mean_caption_tokens']:.1f} "
        f"CLIP-BPE tokens (max {flops['max_caption_tokens']}; OpenCLIP computes 77), "
        f"loss {flops['loss'] / 1e6:.2f} M. Same count for both trainers: padding earns no credit.",
        f"- Training losses (first -> last step): ours {train['ours']['losses'][0]:.3f} -> "
        f"{train['ours']['losses'][-1]:.3f}, OpenCLIP {train['openclip']['losses'][0]:.3f} -> "
        f"{train['openclip']['losses'][-1]:.3f} (same schedule; per-step curves in results.json).",
        f"- Eval: {ev['clip_benchmark_model']}; acc1 ours {ev['ours_acc1']:.3f}, "
        f"CLIP_benchmark {ev['clip_benchmark_acc1']:.3f}.",
        "- Where a target is missed, bench/profiles/ holds the profile summaries that say why "
        "(see README, Benchmarks).",
        "",
    ]
    return "\n".join(lines)
