"""Exports of a TST run's trained model to other frameworks.

    hf          `export_hf`: a Hugging Face `transformers` checkpoint (`nemo-tst export-hf`)
    checkpoint  which checkpoint of a run, read with megatron-core's dist-checkpointing

Needs `safetensors` (and `transformers` to load the result): `pip install 'nemo-tst[hf]'`.
"""

from nemo_tst.export.hf import export_hf, unsupported_settings

__all__ = ["export_hf", "unsupported_settings"]
