"""Glue between the TST math and Megatron-LM's trainer (`megatron.training.pretrain`).

    arguments  --tst-* arguments and the two-phase plan
    data       both phases' samples over one token stream (Megatron's GPTDataset)
    step       forward_step and the loss functions of both phases
    pretrain   one phase on this rank (what torchrun runs)
    driver     both phases: checkpoint directories, handoff, resume
    logs       numbers read back from the trainer's log
    faults     deterministic crash injection for the fault tests

Knows nothing of launchers beyond torchrun on one node.
"""
