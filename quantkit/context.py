"""What a format gets to work with: the source model (loaded once per build), its tokenizer and the shared
calibration set (sampled once per build). Everything is lazy so a build that is all cache hits loads nothing."""
from __future__ import annotations

import copy
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from quantkit.calibration import CalibrationSet, build_calibration, calibration_fingerprint, load_texts

if TYPE_CHECKING:  # annotations only: what a format's code identity covers follows real imports
    from quantkit.recipe.loader import LoadedRecipe
    from quantkit.sources.resolve import ModelSource


class BuildContext:
    # Perplexity of an in-memory model on the build's verification windows, `score_in_memory(model) -> record`,
    # for numbers that exist only during `produce` (a quantizer's fake-quant model). Set by the orchestrator to
    # the evaluation layer's scorer (quantkit.evaluation.in_memory): this module is part of every artifact's code
    # identity and imports no evaluation code.
    score_in_memory: Callable[[Any], dict] | None = None

    def __init__(self, loaded: LoadedRecipe, source: ModelSource, workdir: Path):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.source = source
        self.workdir = workdir

    @cached_property
    def tokenizer_fingerprint(self) -> str:
        return self.source.tokenizer_fingerprint()

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.source.path,
                                             trust_remote_code=self.recipe.model.trust_remote_code)

    @property
    def load_kwargs(self) -> dict:
        """The recipe's trust_remote_code / allow_pickle, as every from_pretrained of the source takes them."""
        from quantkit.sources.remote_code import hf_kwargs

        return hf_kwargs(self.recipe.model.trust_remote_code, self.recipe.model.allow_pickle)

    @cached_property
    def architecture(self):
        """This model's row of the per-architecture table (quantkit/architectures.py), from config.json."""
        from quantkit.architectures import for_config, read_config

        return for_config(read_config(self.source.path))

    @cached_property
    def torch_dtype(self):
        import torch

        name = self.recipe.model.dtype
        if name == "auto":  # CPU has no fast 16-bit matmul here; a GPU host gets bf16
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, name)

    @cached_property
    def device_class(self) -> str:
        """Where formats compute (cuda when this host has a GPU): with the resolved dtype, it keys artifacts."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @cached_property
    def base_model(self):
        """Loaded once; formats that change weights in place must take `fresh_model()` instead."""
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(self.source.path, dtype=self.torch_dtype, **self.load_kwargs)
        m.eval()
        return m

    def fresh_model(self):
        """A private copy of the loaded model (no second read from disk)."""
        return copy.deepcopy(self.base_model)

    @cached_property
    def _calib_text(self):
        c = self.recipe.calibration
        return load_texts(c.dataset, c.split, c.path, c.text_field)

    @cached_property
    def calibration_fingerprint(self) -> str:
        c = self.recipe.calibration
        return calibration_fingerprint(self._calib_text, self.tokenizer_fingerprint, c.num_samples, c.seq_len,
                                       c.seed)

    @cached_property
    def calibration(self) -> CalibrationSet:
        c = self.recipe.calibration
        return build_calibration(self._calib_text, self.tokenizer, self.tokenizer_fingerprint, c.num_samples,
                                 c.seq_len, c.seed)

    def calibration_dataset(self):
        """The calibration set as the `datasets.Dataset` llm-compressor's oneshot takes."""
        import datasets
        import torch

        ids = self.calibration.input_ids
        return datasets.Dataset.from_dict({"input_ids": ids.tolist(),
                                           "attention_mask": torch.ones_like(ids).tolist()})
