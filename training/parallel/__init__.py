"""How a run is spread over devices and processes, and in which precision.

    process_group.py      ranks, world size and device (torchrun / SLURM / one process)
    collectives.py        the feature gather of the losses and the trainer's small collectives
    precision.py          autocast and gradient-scaler policy
    engines.py            EngineConfig (`[engine]`) and build_engine: the one place that wraps the model
    ddp_engine.py         plain / DistributedDataParallel
    deepspeed_engine.py   DeepSpeed ZeRO 0-3
"""
