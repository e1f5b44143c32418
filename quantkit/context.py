"""What a format gets to work with: the source model (read fresh from its files for each target, placed by
quantkit/placement.py), its tokenizer and the shared calibration set (sampled once per build). Everything is lazy so a build that is all cache hits loads nothing."""
from __future__ import annotations

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
        self.devices: dict[str, str] = {}  # stage -> where it ran, for the current target (the manifest's record)

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
    def weight_bytes(self) -> float:
        """The weights at the dtype they are loaded in (what one copy of the model costs)."""
        from quantkit.formats.baseline import weight_stats

        stats = weight_stats(self.source.path)
        return stats["param_count"] * self.torch_dtype.itemsize

    @cached_property
    def placement(self):
        from quantkit.placement import decide, probe

        return decide(self.recipe.model, self.weight_bytes, probe())

    @cached_property
    def meta_model(self):
        """The architecture on the meta device: module names and shapes for option checks, no memory."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(self.source.path, trust_remote_code=self.recipe.model.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=self.recipe.model.trust_remote_code)

    def load_model(self, purpose: str = "layerwise"):
        """A fresh model read from the source files for one target, never a copy of another target's: the
        safetensors are memory-mapped (transformers' tensors are views of the mapping, each page resident once:
        read, or copied on write), so re-reading costs page-cache hits and a build of N targets holds one copy
        at a time. `layerwise`: for llm-compressor, which onloads one layer at a time to the GPU itself
        (weights stay in host RAM or on disk, by `placement`). `whole`: for forward passes quantkit or ModelOpt
        drive; on the GPU when it fits, else across GPU(s) and host RAM."""
        from transformers import AutoModelForCausalLM

        from quantkit.placement import probe, whole_model_device_map

        kw = dict(dtype=self.torch_dtype, **self.load_kwargs)
        pl = self.placement
        if purpose == "whole":
            device_map, where = whole_model_device_map(self.weight_bytes, probe())
            m = AutoModelForCausalLM.from_pretrained(self.source.path, device_map=device_map, **kw)
        elif pl.weights == "disk":
            from compressed_tensors.offload import load_offloaded_model

            import shutil
            import tempfile
            import weakref

            # nothing in host RAM beyond one layer onloaded at a time: every weight is read back from the folder,
            # a private one per target, removed with the model
            folder = tempfile.mkdtemp(prefix="quantkit-offload-", dir=pl.offload_dir)
            with load_offloaded_model():
                m = AutoModelForCausalLM.from_pretrained(
                    self.source.path, device_map="auto_offload", max_memory={"cpu": 0}, offload_folder=folder,
                    **kw)
            weakref.finalize(m, shutil.rmtree, folder, True)
            where = pl.describe()
        elif pl.weights == "gpu":
            m = AutoModelForCausalLM.from_pretrained(self.source.path, device_map={"": 0}, **kw)
            where = pl.describe()
        else:
            m = AutoModelForCausalLM.from_pretrained(self.source.path, **kw)
            where = pl.describe()
        self.devices[purpose] = where
        m.eval()
        return m

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

    @cached_property
    def _calibration_dataset(self):
        import datasets
        import torch

        ids = self.calibration.input_ids
        return datasets.Dataset.from_dict({"input_ids": ids.tolist(),
                                           "attention_mask": torch.ones_like(ids).tolist()})

    def calibration_dataset(self):
        """The calibration set as the `datasets.Dataset` llm-compressor's oneshot takes: converted once per
        build, every calibrated target takes the same (Arrow tables are immutable)."""
        return self._calibration_dataset

    def oneshot_calibration_kwargs(self, rows: range | None = None) -> dict:
        """llm-compressor `oneshot` arguments for the shared calibration set, in its order, unshuffled; `rows`:
        only those samples (one rank's share of a distributed calibration)."""
        ids = self.calibration.input_ids
        ds = self.calibration_dataset()
        if rows is not None:
            ds = ds.select(rows)
        return dict(dataset=ds, num_calibration_samples=len(ds), max_seq_length=ids.shape[1],
                    shuffle_calibration_samples=False)
