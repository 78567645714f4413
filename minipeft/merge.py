"""``python -m minipeft merge``: fold an adapter into its base model and write a plain Hugging Face model.

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
4. **Never half-written**: everything is written into a temporary directory beside ``--out`` and renamed
   into place only after the reload check passed.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from minipeft.errors import UserError
from minipeft.file_modes import use_umask

MERGE_INFO_NAME = "minipeft_merge.json"
SAMPLE_INSTRUCTIONS = ("What is the capital of France?", "Name the opposite of hot.",
                       "Give three tips for staying healthy.")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sample_batch(tokenizer, template: str, device=None) -> dict:
    """A few instructions in ``template``, left-padded: ``{"input_ids", "attention_mask"}`` ``(3, T)``."""
    from minipeft.data.tokenization import pad_token_id
    from minipeft.generation_cli import Prompt, encode_prompts, left_pad

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


def export_merged_model(peft_model, tokenizer, out_dir, template: str = "alpaca", save_dtype=torch.float32,
                        overwrite: bool = False, tolerance: float = 1e-5, extra_info: dict = None,
                        log=print) -> MergeReport:
    """Merge ``peft_model``'s adapter into a copy of its base model and write a plain HF model directory.

    ``peft_model`` should be in float32 (the merge happens in its dtype). The check of merged against
    unmerged logits must pass: ``max |Δ| <= tolerance · max(1, max |logit|)``, relative because float32
    rounding grows with the logits (SmolLM2's reach ~40 and merging leaves ~1e-4 there, ~3e-6 of their size;
    a wrong merge is off by far more). The reloaded directory must pass too when ``save_dtype`` is float32
    (in lower precision its difference is reported, not enforced).

    Raises:
        UserError: for a method that cannot merge, an existing ``out_dir`` without ``overwrite``, or a
            failed check (nothing is written then).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise UserError(f"--out {out_dir}: already exists; choose another directory or pass --overwrite")
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

    merged.to(save_dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        merged.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        if not (temporary / "generation_config.json").is_file() and merged.generation_config is not None:
            merged.generation_config.save_pretrained(temporary)
        reloaded = AutoModelForCausalLM.from_pretrained(temporary, dtype=torch.float32).to(device).eval()
        reloaded_difference = (real_position_logits(reloaded, batch) - unmerged_logits).abs().max().item()
        del reloaded
        log(f"check: max |logit(reloaded from disk, {str(save_dtype).replace('torch.', '')}) - logit(base + adapter)|"
            f" = {reloaded_difference:.2e}")
        if save_dtype == torch.float32 and not reloaded_difference <= limit:
            raise UserError(f"the written model, loaded back, differs from base + adapter by {reloaded_difference:.2e}"
                            f" > {limit:.1e}; nothing written to {out_dir}")
        info = dict(extra_info or {}, template=template, max_abs_logit_difference=difference,
                    max_abs_logit_difference_reloaded=reloaded_difference, save_dtype=str(save_dtype),
                    embeddings=tying)
        (temporary / MERGE_INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for path in [temporary, *temporary.rglob("*")]:  # mkdtemp's 0700, safetensors' 0600 -> the usual modes
            use_umask(path, directory=path.is_dir())
        replace_directory(temporary, out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    files = sorted(path.name for path in out_dir.iterdir())
    return MergeReport(out_dir, difference, reloaded_difference, tying, files)


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished ``source`` directory to ``target``, replacing what was there only at the very end."""
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / "previous")
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minipeft merge",
                                     description="Merge an adapter (LoRA, DoRA, IA3) into its base model and write "
                                                 "a standard Hugging Face model directory.")
    parser.add_argument("--model", default=None,
                        help="base model (default: the adapter's base_model_name_or_path, else builtin)")
    parser.add_argument("--adapter", required=True, help="adapter directory")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--save_dtype", choices=list(SAVE_DTYPES), default="float32",
                        help="dtype of the saved weights; the merge itself is always float32 (default float32)")
    parser.add_argument("--template", choices=["alpaca", "plain", "chat", "none"], default=None,
                        help="template of the check prompts and the one recorded (default: the adapter's)")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest accepted |logit difference| between merged and unmerged, as a fraction of "
                             "the largest |logit| (default 1e-5)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def main(argv=None) -> int:
    from transformers.utils import logging as transformers_logging

    from minipeft.adapter_io import load_adapter
    from minipeft.generation_cli import resolve_model_name, resolve_template
    from minipeft.methods import method_for_config
    from minipeft.models import load_model_and_tokenizer

    args = build_parser().parse_args(argv)
    if not args.tolerance > 0:
        raise UserError(f"--tolerance must be positive, got {args.tolerance}")
    transformers_logging.disable_progress_bar()
    model_name = resolve_model_name(args.model, args.adapter)
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=torch.float32)
    peft_model = load_adapter(model, args.adapter)
    method = method_for_config(peft_model.peft_config)
    template = resolve_template(args.template, args.adapter, model_name, tokenizer)
    print(f"merging the {method.name} adapter {args.adapter} into {model_name} (float32, on a copy)")
    report = export_merged_model(peft_model, tokenizer, args.out, template=template,
                                 save_dtype=SAVE_DTYPES[args.save_dtype], overwrite=args.overwrite,
                                 tolerance=args.tolerance,
                                 extra_info={"base_model": model_name, "adapter": str(args.adapter),
                                             "method": method.name})
    size = sum(path.stat().st_size for path in report.out_dir.iterdir()) / 1e6
    print(f"wrote {report.out_dir} ({size:.1f} MB): {', '.join(report.files)}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(report.out_dir)!r})", file=sys.stdout)
    return 0
