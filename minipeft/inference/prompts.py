"""Generating text for instructions (what ``python -m minipeft generate`` runs): text from a base model, with or without an adapter, from the terminal.

::

    python -m minipeft generate --adapter outputs/adapter --prompt "Name the capital of Peru."
    python -m minipeft generate --model smollm2-135m --prompt "What is the capital of France?"
    python -m minipeft generate --adapter outputs/adapter --prompts_file prompts.txt --batch_size 8 \\
        --do_sample --temperature 0.7 --top_p 0.9 --seed 0 --output_file answers.jsonl

What it does, in order:

1. The base model: ``--model``, or else the ``base_model_name_or_path`` the adapter recorded, or else the
   built-in tiny model. The adapter (``--adapter``, any method) is loaded onto it.
2. The prompt template: a model answers best in the format it was fine-tuned with, so the template the
   adapter was trained with (``"minipeft": {"template": ...}`` in its ``adapter_config.json``, or in a merged
   model directory's ``minipeft_merge.json``) is used; ``--template`` overrides it. With neither
   (``--template auto``, the default): the tokenizer's own chat template when it has one (SmolLM2-Instruct),
   else ``alpaca`` (the built-in model), the same rule as training's ``--template auto``. ``--template none`` feeds the text as it is (plain continuation). Each prompt is an
   *instruction*; ``--input`` adds the Alpaca "input" field.
3. Generation: :func:`minipeft.core.generation.generate` (KV-cached, the same loop for every method), prompts
   batched ``--batch_size`` at a time with **left** padding (so every row's next token follows its last
   real token), greedy by default, sampling with ``--do_sample`` (``--temperature``, ``--top_k``,
   ``--top_p``, ``--seed``), stopping at EOS or after ``--max_new_tokens``.
4. Output: one prompt is streamed to the terminal as it is generated; several are printed in order. The
   speed in new tokens per second goes to stderr. ``--output_file`` also writes one JSON object per prompt.
"""

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


from minipeft.core.errors import UserError
from minipeft.core.generation import check_generation_settings, generate
from minipeft.data.batching import left_pad
from minipeft.data.loading import Unparsable, read_csv_rows
from minipeft.data.templates import TEMPLATES, resolve_template_name
from minipeft.data.tokenization import Prompt, encode_prompts, pad_token_id
from minipeft.fast import fast_generation
from minipeft.files.input_files import read_input_text
from minipeft.files.json_limits import loads_bounded
from minipeft.inference.merge import check_not_merged_already, read_merge_info
from minipeft.loading.streaming import load_base_model
from minipeft.model.adapter_files import read_adapter_config
from minipeft.model.peft_model import load_adapter


# --- choosing the model and the template ------------------------------------------------------------------

def adapter_metadata(adapter_dir) -> dict:
    """The ``"minipeft"`` block of an adapter's config (the template it was trained with, ...), or {}."""
    config = read_adapter_config(adapter_dir)
    return dict(config.get("minipeft") or {}, base_model_name_or_path=config.get("base_model_name_or_path"))


def resolve_model_name(model_flag, adapter_dir) -> str:
    """``--model``, else the base model the adapter was trained on, else ``builtin``."""
    if model_flag:
        return model_flag
    if adapter_dir is not None:
        recorded = adapter_metadata(adapter_dir).get("base_model_name_or_path")
        if recorded is not None and not isinstance(recorded, str):
            raise UserError(f"{Path(adapter_dir) / 'adapter_config.json'}: \"base_model_name_or_path\" must be a "
                            f"model name or path, got {recorded!r:.80}")
        if recorded and str(recorded).startswith(("/", ".", "~")) and not Path(recorded).expanduser().exists():
            # the loader would blame --model, a flag the user did not give
            raise UserError(f"--adapter {adapter_dir}: its adapter_config.json names the base model {recorded}, "
                            "which is not on this machine (moved or deleted?); pass --model with the base model")
        if recorded:
            return recorded
    return "builtin"


@contextmanager
def blaming_the_adapters_base(model_flag, adapter_dir, model_name: str):
    """Within: an error loading the base model names ``--model``; where no ``--model`` was given and the adapter's
    ``adapter_config.json`` named the model (:func:`resolve_model_name`), the error names that field instead."""
    try:
        yield
    except UserError as error:
        named = f"--model {model_name}"
        if model_flag or adapter_dir is None or not str(error).startswith(named):
            raise
        raise UserError(f"{Path(adapter_dir) / 'adapter_config.json'}: \"base_model_name_or_path\" {model_name}"
                        f"{str(error)[len(named):]} (or pass --model with the base model)") from None


def base_model_flag(model_flag, adapter_dir) -> str:
    """How a message names the base model of generate and merge: the flag, or where it came from."""
    return ("--model" if model_flag else "the adapter's base model" if adapter_dir is not None
            else "the built-in model (--model's default)")


def resolve_template(template_flag, adapter_dir, model_name: str, tokenizer) -> str:
    """The prompt template to use (see the module docstring for the order of precedence)."""
    if template_flag and template_flag != "auto":
        return template_flag
    if adapter_dir is not None:
        recorded = adapter_metadata(adapter_dir).get("template")
        if recorded:
            return known_template(recorded, f"{Path(adapter_dir) / 'adapter_config.json'}: \"minipeft.template\"",
                                  tokenizer)
    recorded = read_merge_info(model_name).get("template")  # a model written by `python -m minipeft merge`
    if recorded:
        return known_template(recorded, f"{Path(model_name) / 'minipeft_merge.json'}: \"template\"", tokenizer)
    return resolve_template_name("auto", tokenizer)


def known_template(name, where: str, tokenizer=None) -> str:
    """A template recorded in a file, checked here: the template's own error would blame --template, which the
    user did not give (a recorded ``chat`` on a base whose tokenizer has no chat template included)."""
    if name not in (*TEMPLATES, "none"):
        raise UserError(f"{where} is {name!r:.80}, not a template ({', '.join(TEMPLATES)}, none); pass --template")
    if name == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where} is 'chat', but this base's tokenizer has no chat template (was the adapter "
                        "trained on another base?); pass --template alpaca or --template plain")
    return name


# --- prompts -------------------------------------------------------------------------------------------------

def read_prompts_file(path) -> list:
    """Prompts from a file: a JSON list (of strings, or of ``{"instruction", "input"}`` objects), JSON Lines
    (one such string or object per line: a ``.jsonl``/``.ndjson`` file, a ``.json`` file that is not a list, or
    one whose first line is a JSON object), a ``.csv``/``.tsv`` file with an ``instruction`` column (and
    ``input``, optional: Alpaca records, as ``data`` reads them), or else one prompt per line (blank lines
    skipped). A UTF-8 byte-order mark is not part of the first prompt.

    Raises:
        UserError: naming the file (and the item or line) when it cannot be read or holds no prompt.
    """
    path = Path(path)
    text = read_input_text(path, "--prompts_file")  # (UTF-16 refused, with or without its byte-order mark)
    lines = [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if path.suffix.lower() in (".csv", ".tsv"):  # records, as data and train read the same file: not lines of text
        prompts = _csv_prompts(path, text)
    elif (items := _json_list(text, path)) is not None:
        prompts = [_prompt_of(item, path, f"item {index}") for index, item in enumerate(items)]
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json") or (lines and _json_object(lines[0][1])):
        prompts = []  # JSON Lines: a line of text would otherwise be fed to the model as a prompt, braces and all
        for number, line in lines:
            try:
                item = loads_bounded(line)
            except json.JSONDecodeError as error:
                raise UserError(f"--prompts_file {path}: line {number} is not valid JSON ({error.msg}); a JSON prompts "
                                "file holds a list, or one JSON string or object per line (JSON Lines)") from None
            prompts.append(_prompt_of(item, path, f"line {number}"))
    else:
        prompts = [Prompt(line) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts_file {path}: holds no prompt")
    return prompts


def _csv_prompts(path: Path, text: str) -> list:
    """The prompts of a CSV (or TSV) file of Alpaca records: each row's ``instruction`` and ``input`` cells."""
    separator = "\t" if path.suffix.lower() == ".tsv" else ","
    header, rows = read_csv_rows(path, text, separator, ("instruction", "input"))
    if "instruction" not in header:
        shown = ", ".join(header[:10]) or "none"
        raise UserError(f"--prompts_file {path}: no 'instruction' column (columns found: {shown}); a CSV prompts "
                        "file holds Alpaca records (instruction, and input if any), one per row")
    for where, row in rows:
        if isinstance(row, Unparsable):
            raise UserError(f"--prompts_file {path}: {where} {row.reason}")
    return [_prompt_of(row, path, where) for where, row in rows]


def _json_list(text: str, path: Path):
    """The items of a file that is a JSON list, or None: a file that starts with ``[`` and does not parse is a
    JSON mistake in a ``.json`` file, and prompts of plain text in any other (``[1] What is ...``)."""
    if not text.lstrip().startswith("["):
        return None
    try:
        items = loads_bounded(text)
    except json.JSONDecodeError as error:
        if path.suffix.lower() == ".json":
            raise UserError(f"--prompts_file {path}: not valid JSON ({error})") from None
        return None
    return items if isinstance(items, list) else None


def _json_object(line: str) -> bool:
    """Whether ``line`` is a whole JSON object (so the file is JSON Lines, not prompts of plain text)."""
    try:
        return isinstance(loads_bounded(line), dict)
    except json.JSONDecodeError:
        return False


def _prompt_of(item, path: Path, where: str) -> Prompt:
    """The :class:`Prompt` of one JSON item: a string, or an object with an ``instruction`` string and an
    ``input`` string (or none, or null: no input, as in Alpaca)."""
    instruction = item if isinstance(item, str) else item.get("instruction") if isinstance(item, dict) else None
    if isinstance(instruction, str) and not instruction.strip():  # as --prompt '' is: a reply to nothing
        raise UserError(f"--prompts_file {path}: {where}: the instruction is empty; give one, or leave the item out")
    if isinstance(item, str):
        return Prompt(item)
    if isinstance(item, dict) and isinstance(item.get("instruction"), str):
        given = item.get("input")
        if given is not None and not isinstance(given, str):  # str() made [1, 2] or True a prompt nobody wrote
            kind = ("a boolean" if isinstance(given, bool) else "an array" if isinstance(given, list) else
                    "an object" if isinstance(given, dict) else "a number")
            raise UserError(f"--prompts_file {path}: {where}: \"input\" is {kind}, expected a string")
        return Prompt(item["instruction"], given or "")
    raise UserError(f"--prompts_file {path}: {where} is neither a string nor an object with an \"instruction\" "
                    "string")


def stop_token_ids(tokenizer, model) -> list:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation config EOS id(s)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None and hasattr(model, "base_model"):  # a PeftModel: ask the model it wraps
        configured = getattr(getattr(model.base_model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured] if configured is not None else []
    return list(dict.fromkeys(ids))


# --- generating ----------------------------------------------------------------------------------------------

class TerminalStreamer:
    """Prints one row's text as tokens arrive (batch size 1). Decodes everything so far and prints what is
    new, holding back an incomplete UTF-8 character (shown as U+FFFD until its last byte arrives)."""

    def __init__(self, tokenizer, stop_ids, stream=sys.stdout):
        self.tokenizer, self.stop_ids, self.stream = tokenizer, set(stop_ids), stream
        self.tokens, self.printed, self.stopped = [], "", False

    def __call__(self, token: torch.Tensor) -> None:
        token_id = int(token[0])
        if self.stopped or token_id in self.stop_ids:
            self.stopped = True
            return
        self.tokens.append(token_id)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.stream.write(text[len(self.printed):])
        self.stream.flush()
        self.printed = text


@dataclass
class GenerationResult:
    texts: list  # the reply to each prompt (up to, not including, the first stop token)
    new_tokens: list  # tokens generated per prompt (its stop token included)
    seconds: float  # wall time of the generation calls

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else float("inf")


def fit_new_tokens(model, token_lists: list, max_new_tokens: int) -> int:
    """How many new tokens fit a model with learned positions (GPT-2's ``n_positions``): the longest prompt,
    the virtual tokens of prompt/prefix tuning and the new tokens share them, and past them its position
    embedding has no row (an IndexError deep in the model). Fewer than asked: a ``note:`` line says so; a prompt
    that leaves no room: a :class:`UserError`. Rotary positions (Llama) have no such end and are not limited."""
    positions = getattr(getattr(model, "config", None), "n_positions", None)
    if positions is None or not token_lists:
        return max_new_tokens
    encoder = getattr(model, "prompt_encoder", None)
    virtual = encoder.num_virtual_tokens if encoder is not None and encoder.adapter_enabled else 0
    index, longest = max(enumerate(map(len, token_lists)), key=lambda item: item[1])
    room = positions - virtual - longest + 1  # the last new token is never fed back
    spent = f"{longest} tokens" + (f" after the adapter's {virtual} virtual tokens" if virtual else "")
    if room < 1:
        raise UserError(f"prompt {index + 1} is {spent}, more than the model's {positions} positions: shorten it")
    if max_new_tokens > room:
        print(f"note: prompt {index + 1} is {spent}, so at most {room} new tokens fit the model's {positions} "
              f"positions (not {max_new_tokens})", file=sys.stderr)
    return min(max_new_tokens, room)


def generate_texts(model, tokenizer, prompts: list, template: str, max_new_tokens: int = 64, batch_size: int = 8,
                   do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int = None, stream=None) -> GenerationResult:
    """Generate a reply to each :class:`Prompt` (or string) with ``model`` (a PeftModel or a plain model).

    Args:
        template: ``alpaca``, ``plain``, ``chat`` or ``none``.
        batch_size: prompts per call, left-padded together.
        seed: seeds the sampling generator (reproducible sampling).
        stream: a text stream to print the reply to as it is generated (one prompt only).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {batch_size!r}")
    prompts = [Prompt(prompt) if isinstance(prompt, str) else prompt for prompt in prompts]
    if stream is not None and len(prompts) != 1:
        raise UserError("streaming prints one reply as it is generated: give one prompt (or turn streaming off)")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_ids = stop_token_ids(tokenizer, model)
    token_lists = encode_prompts(prompts, template, tokenizer)  # (a chat template that fails: one error line)
    check_generation_settings(max_new_tokens, do_sample, temperature, top_k, top_p)  # (a bad --top_p first)
    max_new_tokens = fit_new_tokens(model, token_lists, max_new_tokens)
    texts, counts, seconds = [], [], 0.0
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = left_pad(token_lists[start:start + batch_size], pad_token_id(tokenizer), device)
        streamer = TerminalStreamer(tokenizer, stop_ids, stream) if stream is not None else None
        started = time.perf_counter()
        with fast_generation(model):  # (minipeft/fast: the same tokens, sooner)
            new_tokens = generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  eos_token_id=stop_ids or None, pad_token_id=pad_token_id(tokenizer),
                                  streamer=streamer, generator=generator)
        seconds += time.perf_counter() - started
        for row in new_tokens.tolist():
            stop = next((index for index, token in enumerate(row) if token in stop_ids), None)
            reply = row if stop is None else row[:stop]
            counts.append(len(row) if stop is None else stop + 1)
            texts.append(tokenizer.decode(reply, skip_special_tokens=True))
        if streamer is not None:  # whatever the streamer held back (an unfinished character at the very end)
            stream.write(texts[-1][len(streamer.printed):])
            stream.flush()
    return GenerationResult(texts, counts, seconds)


# --- command line ----------------------------------------------------------------------------------------------


def load_for_generation(model_name: str, adapter_dir, dtype, device, quantize: str = "none",
                        quantize_lm_head: bool = False):
    """``(model or PeftModel, tokenizer)`` in eval mode on ``device``; linear layers in NF4 with ``quantize``."""
    model, tokenizer = load_base_model(model_name, quantize, quantize_lm_head, dtype=dtype,
                                       log=lambda message: print(message, file=sys.stderr))
    if tokenizer is None:
        raise UserError(f"--model {model_name}: has no tokenizer; generation needs one")
    if adapter_dir is not None:
        check_not_merged_already(model_name, adapter_dir)
        model = load_adapter(model, adapter_dir)
    return model.to(device).eval(), tokenizer


