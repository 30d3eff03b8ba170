"""What a TST run is, whatever trainer runs it: the integration-neutral core.

    settings         TSTSettings, the one settings type, and SettingNames for errors
    plan             TSTPlan (where phase 1 ends, text per step) and check_plan
    data             both phases' samples over one token stream (Megatron's GPTDataset items),
                     and the device a rank's batch lives on
    loss             both phases' losses in the trainers' contract, the non-finite check
    context_parallel the zig-zag split of latent positions
    step             the phase-1 forward of one micro-batch, both adapters' forward steps
    run_dir          a run directory: which phase, which iteration, load from where

Imports torch and megatron.core only, never megatron.training or Megatron-Bridge: the
adapters `nemo_tst.training` (Megatron-LM's trainer) and `nemo_tst.bridge` stand on it.
"""
