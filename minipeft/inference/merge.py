"""Merging: fold an adapter into its base model and write a plain Hugging Face model.

::

    python -m minipeft merge --adapter outputs/adapter --out merged/
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('merged')"

The output directory is what ``save_pretrained`` writes (``config.json``, ``generation_config.json``,
``model.safetensors``, the tokenizer files) plus ``minipeft_merge.json`` (where it came from, the prompt
template, the check below). Loading it needs ``transformers`` only: no minipeft, no peft, no adapter code,
and inference costs what the base model costs.

Which methods merge: those whose update is a change of existing weights, ``W' = f(W)``:

- LoRA: ``W' = W + s·B A``; DoRA: ``W' = m · (W + s·B A) / ‖W + s·B A‖_c``; IA3: rows or columns of ``W``
  (and ``b``) scaled by ``l``. Trained ``modules_to_save`` copies (e.g. ``lm_head``) replace the originals.
- Not: bottleneck adapters (a nonlinearity between down and up), prefix and prompt tuning (extra keys,
  values or inputs), BitFit and selective fine-tuning (they train base tensors themselves: their "adapter"
  already *is* part of a full model). These stop with a one-line error naming the reason.

How, so that the result can be trusted:

1. The base model is loaded in **float32** and the merge runs on a **copy**
   (:meth:`minipeft.PeftModel.merge_and_unload`): repeated merge/unmerge in bf16 drifts, and the adapted
   model stays intact for the check.
2. **Check**: logits of the merged model and of base + adapter on a few sample prompts (in the adapter's
   template); the max ``|Δ|`` is printed and must be at most ``--tolerance`` times the largest ``|logit|``.
   After writing, the directory is loaded back with plain ``AutoModelForCausalLM.from_pretrained`` and
   checked again (this catches what the in-memory check cannot: a tied weight saved once, a config that
   does not say what the weights are).
3. **Tied embeddings** (GPT-2, SmolLM2: ``lm_head.weight`` *is* the input embedding) stay tied when the
   adapter did not touch the head. When it trained the head (``modules_to_save=["lm_head"]``, or LoRA on
   ``lm_head``), the head is untied, ``tie_word_embeddings`` is set to false, and the report says so:
   keeping the tie would either lose the trained head or overwrite the input embedding with it.
4. **Never half-written, never someone else's**: everything is written into a temporary directory beside
   ``--out`` and renamed into place only after the reload check passed (:mod:`minipeft.files.safe_files`).
   ``--overwrite`` replaces only a directory minipeft wrote, holding only files it recorded, and no
   directory a running training holds (:func:`check_out_dir`); ``--out`` may not be, contain or lie inside
   the adapter or the base model's directory.
5. **Which adapter it holds**: ``minipeft_merge.json`` records the adapter's sha256, so that applying the
   same adapter to the merged model again (which would add its update twice) is refused.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from minipeft.core.errors import UserError
from minipeft.data.batching import left_pad
from minipeft.data.tokenization import Prompt, encode_prompts, pad_token_id
from minipeft.files.input_files import loads_json, read_input_text
from minipeft.files.atomic import json_text
from minipeft.files.safe_files import check_output_directory, write_directory_atomically
from minipeft.model.adapter_files import WEIGHTS_NAME, adapter_fingerprint
from minipeft.quantization.nf4 import dequantize_model, quantize_model

MERGE_INFO_NAME = "minipeft_merge.json"
SAMPLE_INSTRUCTIONS = ("What is the capital of France?", "Name the opposite of hot.",
                       "Give three tips for staying healthy.")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sample_batch(tokenizer, template: str, device=None) -> dict:
    """A few instructions in ``template``, left-padded: ``{"input_ids", "attention_mask"}`` ``(3, T)``."""
    tokens = encode_prompts([Prompt(text) for text in SAMPLE_INSTRUCTIONS], template, tokenizer)
    input_ids, attention_mask = left_pad(tokens, pad_token_id(tokenizer), device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def real_position_logits(model, batch: dict) -> torch.Tensor:
    """Float32 logits at the real (unpadded) positions of a left-padded ``batch``: ``(real tokens, V)``."""
    positions = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)  # as generation computes them
    logits = model(**batch, position_ids=positions).logits.float()  # (B, T, V)
    return logits[batch["attention_mask"].bool()]


def max_logit_difference(model_a, model_b, batch: dict) -> float:
    """``max |logits_a - logits_b|`` over the real positions of ``batch``, in float32."""
    return (real_position_logits(model_a, batch) - real_position_logits(model_b, batch)).abs().max().item()


def describe_tying(base_model, merged_model) -> str:
    """One line on what happened to tied input/output embeddings."""
    was_tied = getattr(base_model.config, "tie_word_embeddings", False)  # (its lm_head may be a trained copy now)
    is_tied = merged_model.get_output_embeddings().weight is merged_model.get_input_embeddings().weight
    if not was_tied:
        return "embeddings: not tied in the base model; nothing to keep"
    if is_tied:
        return "embeddings: kept tied (the adapter did not change the output head)"
    return ("embeddings: UNTIED: the adapter trained the output head, which the base model shared with the input "
            "embedding; the merged model stores both and says tie_word_embeddings=false")


@dataclass
class MergeReport:
    out_dir: Path
    max_abs_difference: float  # merged vs unmerged, in memory, float32
    max_abs_difference_reloaded: float  # the written directory, loaded back, vs unmerged
    tying: str
    files: list


def check_out_dir(out_dir, overwrite: bool) -> Path:
    """``--out`` may be new or empty; an existing one is replaced only with ``overwrite`` and only when minipeft
    wrote it and every file in it (:func:`~minipeft.files.safe_files.check_replaceable`), and never while a
    training run holds its lock or its parent's (a new directory inside a running run's folder)."""
    return check_output_directory(out_dir, "--out", overwrite)


def export_merged_model(peft_model, tokenizer, out_dir, template: str = "alpaca", save_dtype=torch.float32,
                        overwrite: bool = False, tolerance: float = 1e-5, extra_info: dict = None,
                        log=print, requantize: bool = False) -> MergeReport:
    """Merge ``peft_model``'s adapter into a copy of its base model and write a plain HF model directory.

    ``peft_model`` should be in float32 (the merge happens in its dtype). The check of merged against
    unmerged logits must pass: ``max |Δ| <= tolerance · max(1, max |logit|)``, relative because float32
    rounding grows with the logits (SmolLM2's reach ~40 and merging leaves ~1e-4 there, ~3e-6 of their size;
    a wrong merge is off by far more). The reloaded directory must pass too when ``save_dtype`` is float32
    (in lower precision its difference is reported, not enforced).

    ``requantize``: after the check, quantize the merged linear layers to NF4 again (what merging into a 4-bit
    base does: peft's "Merge lora module to 4-bit linear may get different generations due to rounding
    errors"), print the measured logit change, and write the float32 values of those 4-bit weights.

    Raises:
        UserError: for a method that cannot merge, an existing ``out_dir`` without ``overwrite``, or a
            failed check (nothing is written then).
    """
    from transformers import AutoModelForCausalLM

    out_dir = check_out_dir(out_dir, overwrite)
    quantizer = getattr(peft_model.base_model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(quantizer.quantization_config, "quant_method", "?")
        raise UserError(f"the base model is quantized ({getattr(method, 'value', method)}); merging needs its float "
                        "weights: load it without quantization")
    peft_model.eval()
    merged = peft_model.merge_and_unload().eval()  # on a copy; raises UserError for methods that cannot merge
    device = next(merged.parameters()).device
    batch = sample_batch(tokenizer, template, device)
    unmerged_logits = real_position_logits(peft_model, batch)  # (real tokens, V)
    limit = tolerance * max(1.0, unmerged_logits.abs().max().item())
    difference = (real_position_logits(merged, batch) - unmerged_logits).abs().max().item()
    tokens = int(batch["attention_mask"].sum())
    log(f"check: max |logit(merged) - logit(base + adapter)| = {difference:.2e} over {len(SAMPLE_INSTRUCTIONS)} "
        f"prompts ({tokens} tokens, {next(merged.parameters()).dtype}); limit {limit:.1e} "
        f"(--tolerance {tolerance:g} x max |logit|)")
    if not difference <= limit:
        raise UserError(f"merged and unmerged logits differ by {difference:.2e} > {limit:.1e} (--tolerance "
                        f"{tolerance:g} x max |logit|); nothing written to {out_dir}")
    tying = describe_tying(peft_model.base_model, merged)
    log(tying)
    requantized_difference = None
    if requantize:
        quantize_model(merged, compute_dtype=torch.float32)
        requantized_difference = (real_position_logits(merged, batch) - unmerged_logits).abs().max().item()
        dequantize_model(merged)  # the float32 values of the 4-bit weights: a plain model that loads anywhere
        log(f"requantize: the merged linear layers are NF4 again; max |logit(requantized) - logit(base + adapter)| "
            f"= {requantized_difference:.2e} (quantizing again rounds: the merged weights to NF4 codes, and each "
            "block's scale to 8 bits anew, which moves even a weight ΔW left unchanged; written as float32 values "
            "of the 4-bit weights)")

    merged.to(save_dtype)

    def write(temporary: Path) -> None:
        merged.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        if not (temporary / "generation_config.json").is_file() and merged.generation_config is not None:
            merged.generation_config.save_pretrained(temporary)
        reloaded = AutoModelForCausalLM.from_pretrained(temporary, dtype=torch.float32).to(device).eval()
        reloaded_difference = (real_position_logits(reloaded, batch) - unmerged_logits).abs().max().item()
        del reloaded
        log(f"check: max |logit(reloaded from disk, {str(save_dtype).replace('torch.', '')}) - logit(base + adapter)|"
            f" = {reloaded_difference:.2e}")
        if save_dtype == torch.float32 and not requantize and not reloaded_difference <= limit:
            raise UserError(f"the written model, loaded back, differs from base + adapter by {reloaded_difference:.2e}"
                            f" > {limit:.1e}; nothing written to {out_dir}")
        info = dict(extra_info or {}, template=template, max_abs_logit_difference=difference,
                    max_abs_logit_difference_reloaded=reloaded_difference, save_dtype=str(save_dtype),
                    max_abs_logit_difference_requantized=requantized_difference,
                    embeddings=tying)
        (temporary / MERGE_INFO_NAME).write_text(json_text(info, sort_keys=True))
        checks.append(reloaded_difference)

    checks = []
    write_directory_atomically(out_dir, write, "--out")
    files = sorted(path.name for path in out_dir.iterdir())
    return MergeReport(out_dir, difference, checks[0], tying, files)


def read_merge_info(model_name) -> dict:
    """The ``minipeft_merge.json`` of a merged model directory, or {} for any other model."""
    path = Path(model_name) / MERGE_INFO_NAME
    if not path.is_file():
        return {}
    try:
        info = loads_json(read_input_text(path))
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    return info if isinstance(info, dict) else {}


def check_not_merged_already(model_name, adapter_dir) -> None:
    """Refuse to apply an adapter to a model that already holds it merged (its update would count twice)."""
    recorded = read_merge_info(model_name).get("adapter_sha256")
    if recorded and (Path(adapter_dir) / WEIGHTS_NAME).is_file() and adapter_fingerprint(adapter_dir) == recorded:
        raise UserError(f"--adapter {adapter_dir}: --model {model_name} already holds this adapter merged "
                        f"(see its {MERGE_INFO_NAME}); applying it again would add its update twice: use the "
                        "merged model without --adapter")


