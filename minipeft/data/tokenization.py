"""Tokenizing records into ``prompt ids + response ids + EOS``, truncating, and caching the result on disk.

For one record, with P prompt tokens and R response tokens (EOS included)::

    input_ids  [ p0  p1  ...  p(P-1)  r0  r1  ...  EOS ]
    labels     [ -100 -100 ... -100   r0  r1  ...  EOS ]     (train_on_inputs: labels = input_ids)

Labels stay *aligned* with input_ids here (the Hugging Face convention): the training loss shifts them by one,
once, so that the logits at position t are scored against the token at t+1. The first token of a record is
never a target after that shift, so its label is always -100; that also keeps a packed record from being
asked to predict the first token of the next one.

The prompt and the response are tokenized separately, so the prompt ids are exactly the ids generation
feeds the model (:func:`encode_prompt`), and the mask boundary is exact. The real EOS is found by position,
never by id, so it stays a target even when the tokenizer pads with its EOS id (GPT-2, SmolLM2).

Truncation to ``max_length`` keeps the response where possible: the prompt keeps at least
``min(P, max_length // 2)`` tokens (more if the response is short), losing tokens from its start but keeping
a leading BOS; the response loses tokens from its end (and then has no EOS: the model is not taught to stop
in mid-sentence).

A record longer than ``max_length × 64`` characters (:data:`CHARACTERS_PER_TOKEN_BOUND`) is refused before any
tokenizer sees it, naming the record and the file: a token of a real vocabulary covers far fewer than 64
characters, so such a record would keep at most a sliver of itself after truncation, and one record of 100 MB
would otherwise hold the tokenizer (and its memory) for minutes. Refused rather than cut by characters: which
end of which field truncation keeps depends on the token counts, so a character cut could change what a record
that fits trains on; the message says to shorten it or raise ``--max_length``.

Results are cached in ``cache_dir`` as ``.npz`` files keyed by a hash of the records, the tokenizer, the
template and ``max_length``; a second run with the same inputs loads them instead of tokenizing.
"""

import hashlib
import itertools
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minipeft.data.templates import TEMPLATES, format_prompt, prompt_and_response
from minipeft.core.errors import UserError
from minipeft.files.safe_files import write_file_atomically

CACHE_VERSION = "minipeft-data-2"  # change when the layout or the meaning of a cache file changes
IGNORE_INDEX = -100  # label of a token that is not trained on (PyTorch cross_entropy's ignore_index)
ENCODE_CHUNK = 4096  # texts per call to the tokenizer (and per step of the progress bar)
PROGRESS_MIN_RECORDS = 10_000  # show a progress bar from this many records on
CHARACTERS_PER_TOKEN_BOUND = 64  # a record of more than max_length × this many characters is refused


@dataclass
class TokenizedRecords:
    """All records as one flat array of token ids, without padding.

    Record ``i`` is ``token_ids[offsets[i]:offsets[i + 1]]``; its first ``prompt_lengths[i]`` tokens are the
    prompt. ``truncated[i]``: the record was cut to ``max_length``; ``response_cut[i]``: its response lost
    tokens (and its EOS).
    """

    token_ids: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (n + 1,) int64
    prompt_lengths: np.ndarray  # (n,) int32
    truncated: np.ndarray  # (n,) bool
    response_cut: np.ndarray  # (n,) bool
    cache_path: str | None = None
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    @property
    def lengths(self) -> np.ndarray:
        """(n,) tokens per record."""
        return np.diff(self.offsets)

    def example(self, index: int, train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one record, unpadded and aligned (see the module docstring)."""
        input_ids = self.token_ids[self.offsets[index]:self.offsets[index + 1]].tolist()
        masked = 1 if train_on_inputs else max(1, int(self.prompt_lengths[index]))
        labels = [IGNORE_INDEX] * masked + input_ids[masked:]
        return input_ids, labels


def eos_token_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; every response must end with one "
                        "so that the model learns to stop")
    return tokenizer.eos_token_id


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id. Padding is masked by position, so sharing the EOS id is safe.

    The tokenizer itself is left as it is (no ``pad_token`` is set on the caller's object).
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id(tokenizer)


def encode_texts(tokenizer, texts: list[str], add_special_tokens: bool, progress: bool = False) -> list[list[int]]:
    """Token ids of many texts, in batches.

    A fast tokenizer's Rust backend encodes each batch on all cores (``encode_batch_fast`` skips the offsets
    we do not need); the result equals ``tokenizer(texts)["input_ids"]``. A backend configured to truncate
    or pad, or a slow tokenizer, goes through the Python tokenizer instead.
    """
    from tqdm.auto import tqdm

    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    use_backend = backend is not None and backend.truncation is None and backend.padding is None
    ids = []
    chunks = range(0, len(texts), ENCODE_CHUNK)
    for start in tqdm(chunks, desc="tokenizing", unit="chunk", disable=not progress, leave=False):
        chunk = texts[start:start + ENCODE_CHUNK]
        if use_backend:
            encodings = backend.encode_batch_fast(chunk, add_special_tokens=add_special_tokens)
            ids.extend(encoding.ids for encoding in encodings)
        else:
            ids.extend(tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"])
    return ids


def prompt_needs_special_tokens(template: str) -> bool:
    """Chat prompts already hold their special tokens as text; the others get the tokenizer's own (e.g. BOS)."""
    return template != "chat"


def encode_prompt(instruction: str, input: str, template: str, tokenizer) -> list[int]:
    """The prompt's token ids exactly as in training: what generation should feed the model."""
    prompt = format_prompt(instruction, input, template, tokenizer)
    return encode_texts(tokenizer, [prompt], prompt_needs_special_tokens(template))[0]


@dataclass
class Prompt:
    """An instruction to generate a reply to (a record without its response)."""

    instruction: str
    input: str = ""


def encode_prompts(prompts: list, template: str, tokenizer) -> list:
    """Token ids of each :class:`Prompt`, exactly as in training (:func:`encode_prompt`); ``template="none"``
    feeds the text as it is (plain continuation)."""
    if template == "none":
        return [tokenizer(prompt.instruction + (f"\n{prompt.input}" if prompt.input else ""))["input_ids"]
                for prompt in prompts]
    return [encode_prompt(prompt.instruction, prompt.input, template, tokenizer) for prompt in prompts]


def truncate_example(prompt_ids: list[int], response_ids: list[int], max_length: int,
                     bos_id: int | None = None) -> tuple[list[int], list[int]]:
    """Fit ``prompt + response`` into ``max_length`` tokens, keeping the response where possible."""
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    keep_prompt = min(len(prompt_ids), max(max_length - len(response_ids), max_length // 2))
    if keep_prompt < len(prompt_ids):  # cut the prompt's start; a leading BOS stays first
        head = prompt_ids[:1] if bos_id is not None and prompt_ids[0] == bos_id else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - keep_prompt + len(head):]
    return prompt_ids, response_ids[:max_length - keep_prompt]


def check_record_lengths(records, max_length: int, source: str = "") -> None:
    """Refuse a record of more than ``max_length × 64`` characters (see the module docstring); ``source``
    names the file."""
    limit = max_length * CHARACTERS_PER_TOKEN_BOUND
    for index, record in enumerate(records):
        size = len(record.instruction) + len(record.input) + len(record.output)
        if size > limit:
            where = f"{source}: " if source else ""
            raise UserError(f"{where}{record.source or f'record {index}'} has {size:,} characters, more than "
                            f"--max_length {max_length} tokens can hold ({limit:,} = {max_length} × "
                            f"{CHARACTERS_PER_TOKEN_BOUND}); shorten or split it, or raise --max_length")


def tokenize_records(records, tokenizer, template: str = "alpaca", max_length: int = 256,
                     cache_dir: str | None = None, progress: bool = True, source: str = "") -> TokenizedRecords:
    """Tokenize, append EOS, and truncate every record; load from / save to the cache when ``cache_dir`` is set.
    ``source`` (the data file) names where a record too long to tokenize comes from."""
    check_record_lengths(records, max_length, source)
    eos = eos_token_id(tokenizer)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"tokenized-{cache_key(records, tokenizer, template, max_length)}.npz"
        cached = _load_cache(cache_path)
        if cached is not None:
            problem = cache_problem(cached, len(records), len(tokenizer), max_length)
            if problem is None:
                return cached
            print(f"warning: the tokenization cache {cache_path} {problem}: it was edited or damaged; "
                  f"tokenizing again and rewriting it", file=sys.stderr)

    pairs = [prompt_and_response(record, template, tokenizer) for record in records]
    show = progress and len(records) >= PROGRESS_MIN_RECORDS
    prompts = encode_texts(tokenizer, [prompt for prompt, _ in pairs], prompt_needs_special_tokens(template),
                           progress=show)
    responses = encode_texts(tokenizer, [response for _, response in pairs], add_special_tokens=False, progress=show)

    examples, truncated, response_cut = [], [], []
    bos = tokenizer.bos_token_id
    for prompt_ids, response_ids in zip(prompts, responses):
        if not response_ids or response_ids[-1] != eos:  # a chat template may already end the turn with EOS
            response_ids = response_ids + [eos]
        kept_prompt, kept_response = truncate_example(prompt_ids, response_ids, max_length, bos)
        examples.append((kept_prompt, kept_response))
        truncated.append(len(kept_prompt) + len(kept_response) < len(prompt_ids) + len(response_ids))
        response_cut.append(len(kept_response) < len(response_ids))

    lengths = np.array([len(p) + len(r) for p, r in examples], dtype=np.int64)
    tokenized = TokenizedRecords(
        token_ids=np.fromiter(itertools.chain.from_iterable(p + r for p, r in examples), dtype=np.int32,
                              count=int(lengths.sum())),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_lengths=np.array([len(p) for p, _ in examples], dtype=np.int32),
        truncated=np.array(truncated, dtype=bool),
        response_cut=np.array(response_cut, dtype=bool),
        cache_path=str(cache_path) if cache_path else None,
    )
    if cache_path is not None:
        _save_cache(cache_path, tokenized)
    return tokenized


def cache_key(records, tokenizer, template: str, max_length: int) -> str:
    """sha256 (first 32 hex digits) of everything the tokenized result depends on."""
    digest = hashlib.sha256()
    for part in (CACHE_VERSION, repr(TEMPLATES[template]), str(max_length), tokenizer_fingerprint(tokenizer)):
        digest.update(part.encode() + b"\x00")
    for record in records:
        digest.update(f"{record.instruction}\x1f{record.input}\x1f{record.output}\x1e".encode())
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, special tokens, chat template)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    if getattr(tokenizer, "is_fast", False):
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                getattr(tokenizer, "chat_template", None))
    digest.update(repr(specials).encode())
    return digest.hexdigest()


_CACHE_ARRAYS = ("token_ids", "offsets", "prompt_lengths", "truncated", "response_cut")


def _content_digest(arrays: dict) -> np.ndarray:
    """sha256 of the cached arrays (dtype, shape and bytes of each), stored beside them: the file's name is a
    hash of its inputs, so only this tells an edited file (ids swapped for others within the vocabulary)."""
    digest = hashlib.sha256()
    for name in _CACHE_ARRAYS:
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def _load_cache(path: Path) -> TokenizedRecords | None:
    """The cached result, or None when there is none; an unreadable cache file is ignored and rewritten, and one
    whose content no longer matches its stored digest is said and rewritten."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as arrays:
            loaded = {name: arrays[name] for name in _CACHE_ARRAYS}
            stored = arrays["digest"] if "digest" in arrays.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    if stored is None or not np.array_equal(stored, _content_digest(loaded)):
        print(f"warning: the tokenization cache {path} does not match its own digest: it was edited or damaged; "
              "tokenizing again and rewriting it", file=sys.stderr)
        return None
    return TokenizedRecords(**loaded, cache_path=str(path), from_cache=True)


def cache_problem(cached: TokenizedRecords, records: int, vocabulary: int, max_length: int) -> str | None:
    """What makes a loaded cache file unusable for these records, or None. Its name is a hash of its inputs,
    not of its content: a file edited (or written by another minipeft) under that name must not reach the
    embedding with ids beyond the vocabulary or the loss with prompt lengths beyond their records."""
    ids, offsets, prompts = cached.token_ids, cached.offsets, cached.prompt_lengths
    if any(array.ndim != 1 for array in (ids, offsets, prompts, cached.truncated, cached.response_cut)):
        return "holds arrays of another shape"
    if not (np.issubdtype(ids.dtype, np.integer) and np.issubdtype(offsets.dtype, np.integer)
            and np.issubdtype(prompts.dtype, np.integer)):
        return "holds arrays of another type"
    if len(prompts) != records or len(offsets) != records + 1 or len(cached.truncated) != records \
            or len(cached.response_cut) != records:
        return f"holds another number of records than the {records} of the data"
    lengths = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != len(ids) or (lengths < 1).any() or (lengths > max_length).any():
        return f"holds record bounds that do not fit its token ids and --max_length {max_length}"
    if ((prompts < 0) | (prompts > lengths)).any():
        return "holds prompt lengths beyond their records"
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocabulary):
        return f"holds token ids outside the tokenizer's vocabulary of {vocabulary}"
    return None


def _save_cache(path: Path, tokenized: TokenizedRecords) -> None:
    """Write to a temporary file and rename it, so a cache file is never half-written."""
    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            arrays = {name: getattr(tokenized, name) for name in _CACHE_ARRAYS}
            np.savez(handle, **arrays, digest=_content_digest(arrays))

    try:
        write_file_atomically(path, write)
    except UserError as error:  # a read-only or full cache directory costs speed, not the run
        print(f"warning: could not write the tokenization cache: {error}", file=sys.stderr)
        tokenized.cache_path = None
