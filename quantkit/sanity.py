"""Is the baseline a working model? Checked before any target is built, so a broken source (a wrong import, a
wrong dtype, a truncated download) never reaches the table with confident-looking deltas.

Two checks on the loaded model, a few seconds on CPU:
- perplexity on the first windows of the recipe's first evaluation set must be far below uniform guessing:
  below `ppl_limit(vocab)` (vocab/64, clamped to [100, 1000]; a working LM scores ~5-60 on WikiText-2, a broken
  import of SmolLM2 scored 43,000);
- greedy continuation of obvious sequences (weekdays, months, counting): at least 2 of 3 right.

Skipping is always explicit and recorded in every manifest: `--no-sanity-check` / `model.sanity_check: false`,
or a model directory that declares random weights (`quantkit-random-weights.json`, written by whatever made
the random model: test fixtures, the `dummy:` source).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from quantkit.errors import UserError

RANDOM_WEIGHTS_MARKER = "quantkit-random-weights.json"
PROBES = (("Monday, Tuesday, Wednesday, Thursday,", "Friday"),
          ("January, February, March, April,", "May"),
          ("one, two, three, four, five,", "six"))
MIN_PROBES_RIGHT = 2
WINDOWS, MAX_SEQ_LEN = 4, 512


def declare_random_weights(model_dir: Path, made_by: str) -> None:
    """Mark a directory of random weights (tests, dummy sources): builds skip the sanity check, recorded."""
    (Path(model_dir) / RANDOM_WEIGHTS_MARKER).write_text(json.dumps({"random_weights": True, "made_by": made_by}))


def skip_reason(source_path: Path, enabled: bool, flag: bool) -> str | None:
    if flag:
        return "--no-sanity-check"
    if not enabled:
        return "recipe model.sanity_check: false"
    marker = Path(source_path) / RANDOM_WEIGHTS_MARKER
    if marker.is_file():
        return f"random weights declared by {marker.name} ({json.loads(marker.read_text()).get('made_by', '?')})"
    return None


def ppl_limit(vocab: int) -> float:
    return min(1000.0, max(100.0, vocab / 64))


def _next_token_text(model, tokenizer, prompt: str) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    with torch.inference_mode():
        nxt = model(input_ids=ids).logits[0, -1].argmax().item()
    return tokenizer.decode([nxt]).strip()


def check_baseline(ctx) -> dict:
    """Run both checks on the baseline model (read fresh, on the GPU when there is one, freed after); returns
    the record for the manifests or raises a one-line UserError."""
    from quantkit.evaluation.engines.transformers_engine import Loaded, TransformersEngine
    from quantkit.evaluation.perplexity import make_windows, perplexity

    t0 = time.perf_counter()
    model, tok = ctx.load_model("whole"), ctx.tokenizer
    ctx.devices.pop("whole", None)
    ppl_spec = ctx.recipe.eval.perplexity
    dataset = ppl_spec.datasets[0] if ppl_spec and ppl_spec.datasets else "wikitext2"
    seq_len = min(ppl_spec.seq_len if ppl_spec else MAX_SEQ_LEN, MAX_SEQ_LEN)
    windows = make_windows(dataset, tok, ctx.tokenizer_fingerprint, seq_len, WINDOWS)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    ppl = perplexity(TransformersEngine(), Loaded(model, str(model.device), dtype), windows)["ppl"]
    vocab = int(model.config.get_text_config().vocab_size)
    limit = ppl_limit(vocab)
    probes = [{"prompt": p, "expected": want, "got": _next_token_text(model, tok, p)} for p, want in PROBES]
    right = sum(x["got"].lower().startswith(x["expected"].lower()[:3]) for x in probes)
    record = {"status": "passed", "ppl": round(ppl, 3), "ppl_limit": limit, "dataset": dataset,
              "windows": int(windows.ids.shape[0]), "seq_len": seq_len, "vocab_size": vocab,
              "probes_right": right, "probes": probes, "wall_s": round(time.perf_counter() - t0, 2)}
    fix = ("check the source (a GGUF import, dtype, truncated weights); --no-sanity-check only for a model "
           "known to be fine")
    if not math.isfinite(ppl) or ppl > limit:
        raise UserError(f"baseline {ctx.source.uri} does not look like a working model: {dataset} perplexity "
                        f"{ppl:.1f} on {windows.ids.shape[0]}x{seq_len} tokens (limit {limit:.0f} for a "
                        f"{vocab}-token vocabulary; uniform guessing scores {vocab})", fix=fix)
    if right < MIN_PROBES_RIGHT:
        got = "; ".join(f"{x['prompt']!r} -> {x['got']!r}" for x in probes)
        raise UserError(f"baseline {ctx.source.uri} does not look like a working model: it continued only "
                        f"{right} of {len(probes)} obvious sequences ({got})", fix=fix)
    return record
