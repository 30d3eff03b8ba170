"""The Megatron-LM adapter: TST on Megatron-LM's trainer (`megatron.training.pretrain`).

    arguments  --tst-* arguments to and from TSTSettings, and the plan from Megatron's args
    step       forward_step and the loss functions of both phases
    pretrain   one phase on this rank (what torchrun runs)
    driver     both phases from one command: checks before launch, launch, resume
    logs       numbers read back from the trainer's log
    faults     deterministic crash injection for the fault tests, installed only on request

What a run is (settings, plan, data, losses, run directory) is `nemo_tst.core`'s. Knows
nothing of launchers beyond torchrun on one node.
"""
