"""Export a clipstream checkpoint for OpenCLIP and CLIP_benchmark.

    python -m training.interop.export --checkpoint runs/x --out export/x

--checkpoint takes a checkpoint .pt or a run folder (its newest checkpoint). Writes
open_clip_pytorch_model.bin, open_clip_config.json and NAME.json into --out and prints how to
load them (see training.interop.export_checkpoint).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_pipeline.errors import run_main
from training.interop.export_checkpoint import export_openclip
from training.model.trained import load_trained_model, resolve_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.interop.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint .pt or run folder")
    p.add_argument("--out", type=Path, required=True, help="folder to write the files into")
    args = p.parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    files = export_openclip(load_trained_model(checkpoint), args.out)
    print(f"exported {checkpoint} as OpenCLIP {files.openclip_name}:")
    for path in (files.weights, files.config, files.model_config):
        print(f"  {path}")
    print("load it with:")
    print(f'  open_clip.create_model_and_transforms("{files.openclip_name}", '
          f'pretrained="{files.weights}")')
    print(f'  open_clip.create_model_and_transforms("local-dir:{args.out}")')
    print(f"  clip_benchmark eval --model {files.openclip_name} --pretrained {files.weights} "
          "--dataset cifar10 --dataset_root DIR")
    return 0


if __name__ == "__main__":
    run_main(main)
