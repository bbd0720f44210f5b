"""Interop with the OpenAI/OpenCLIP ecosystem: their checkpoints in, ours out.

    openclip_layout.py    the documented key mapping between OpenCLIP's state-dict layout and
                          ours (both ways), the architectures both share, and our config as an
                          OpenCLIP model-config JSON
    import_checkpoint.py  an OpenAI (TorchScript) or OpenCLIP (.bin/.pt/.safetensors) file into
                          our CLIP, strictly; `python -m eval.run --pretrained` uses it
    export_checkpoint.py  our checkpoint as OpenCLIP-loadable weights + model config
    export.py             CLI: python -m training.interop.export --checkpoint runs/X --out DIR

OpenCLIP and CLIP_benchmark are never imported here: they are the references the tests
(tests/test_interop_*.py) measure this package against.
"""
