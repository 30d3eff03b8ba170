"""`TSTDatasetProvider`: both phases' data for Bridge, over the recipe's GPTDatasetConfig.

A subclass of Bridge's `DatasetProvider`, created on first use (Bridge imports only with
Transformer Engine). Training: `nemo_tst.core.data.TSTTrainDataset` over GPTDataset items, so
phase 2 continues where phase 1 stopped and a resume in either phase reads what the
uninterrupted run would; validation and test are the recipe's GPTDataset at L.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

from nemo_tst.bridge.checks import require_bridge
from nemo_tst.core.plan import TSTPlan

__all__ = ["dataset_provider_class"]

_PROVIDER_CLASS = None


def dataset_provider_class():
    """The `TSTDatasetProvider` class (Bridge's DatasetProvider is its base)."""
    global _PROVIDER_CLASS
    if _PROVIDER_CLASS is not None:
        return _PROVIDER_CLASS
    require_bridge()
    from megatron.bridge.data.base import DataloaderConfig, DatasetProvider

    @dataclass(kw_only=True)
    class TSTDatasetProvider(DatasetProvider):
        """Both phases' data over one token stream. `base` is the recipe's GPTDatasetConfig
        (seq_length L); `plan` the run's plan; `tst_phase` the phase of the container."""

        base: Any
        plan: TSTPlan
        run_dir: str
        tst_phase: int

        @classmethod
        def from_recipe(cls, dataset_cfg, plan: TSTPlan, run_dir: str, phase: int):
            loader = {f.name: getattr(dataset_cfg, f.name) for f in fields(DataloaderConfig) if f.init}
            return cls(**loader, base=copy.deepcopy(dataset_cfg), plan=plan, run_dir=str(run_dir), tst_phase=phase)

        def finalize(self) -> None:
            DataloaderConfig.finalize(self)
            copy.deepcopy(self.base).finalize()  # the recipe dataset's own checks, now

        def _gpt_config(self, sequence_length: int, tokenizer):
            cfg = copy.deepcopy(self.base)
            cfg.seq_length = sequence_length
            cfg.finalize()
            cfg.tokenizer = tokenizer
            if getattr(cfg, "token_dtype_code", 0) is None and getattr(tokenizer, "vocab_size", None):
                import numpy

                cfg.token_dtype_code = 4 if tokenizer.vocab_size > numpy.iinfo(numpy.uint16).max + 1 else 8
            return cfg

        def build_datasets(self, context):
            from megatron.core.datasets.blended_megatron_dataset_builder import (
                BlendedMegatronDatasetBuilder,
            )
            from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

            from nemo_tst.core.data import TSTTrainDataset, item_sequence_length, items_needed

            plan = self.plan
            items_cfg = self._gpt_config(item_sequence_length(plan), context.tokenizer)
            eval_cfg = self._gpt_config(plan.seq_length, context.tokenizer)
            dataset_type = MockGPTDataset if items_cfg.mock else GPTDataset
            # Every rank builds and reads the data, as Bridge's own GPT provider does (each
            # tensor-parallel rank reads the same samples; no broadcast). The split each builder
            # does not need is asked for 1 sample, not None: megatron-core refuses a None size
            # for a weighted blend.
            items, _, _ = BlendedMegatronDatasetBuilder(
                dataset_type, [items_needed(plan), 1, 1], lambda: True, items_cfg
            ).build()
            _, valid, test = BlendedMegatronDatasetBuilder(
                dataset_type, [1, context.valid_samples, context.test_samples], lambda: True, eval_cfg
            ).build()
            train = None if items is None else TSTTrainDataset(items, plan)
            return train, valid, test

    # `nemo_tst.bridge.TSTDatasetProvider` is the class path Bridge writes into run_config.yaml.
    TSTDatasetProvider.__module__ = "nemo_tst.bridge"
    TSTDatasetProvider.__qualname__ = "TSTDatasetProvider"
    _PROVIDER_CLASS = TSTDatasetProvider
    return TSTDatasetProvider
