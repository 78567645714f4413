"""Pretrain the built-in tiny GPT-2 from scratch: ``python -m minipeft pretrain``.

What it does, top to bottom (about 6 minutes on 2 CPU cores):

1. write 55,000 short documents with :func:`minipeft.pretraining.corpus.generate_corpus` (seed 0) and 500
   held-out ones (seed 1) for the final evaluation;
2. train a byte-level BPE tokenizer on them (GPT-2 style: ``<|endoftext|>`` is bos, eos and unk; no pad);
3. pack the documents, each followed by ``<|endoftext|>``, into blocks of 128 tokens;
4. train a 4-layer :class:`transformers.GPT2LMHeadModel` (Conv1D layers and tied embeddings, as GPT-2) for
   one pass over the blocks with AdamW, linear warmup then cosine decay, gradient clipping at 1.0;
5. report the held-out loss and save model, tokenizer and generation config to ``--output_dir``
   (default ``minipeft/builtin/model``), replacing the old directory only once the new one is complete, and
   only with ``--overwrite`` and only a directory minipeft wrote (its ``.minipeft`` record lists every file).

The run is deterministic on one machine (seeded corpus, seeded initialisation and block order); on
another CPU or torch version the float results differ in the last bits.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from minipeft.files.safe_files import check_output_directory, write_directory_atomically
from minipeft.pretraining.corpus import generate_corpus

EOS_TOKEN = "<|endoftext|>"

@dataclass
class PretrainConfig:
    num_documents: int = 55_000  # ~2.3M tokens, one pass
    heldout_documents: int = 500
    vocab_size: int = 4096  # an upper bound: BPE stops once every corpus word is one token (~3,000)
    n_embd: int = 160
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 512  # the model accepts 512 tokens; pretraining blocks are shorter
    block_size: int = 128
    batch_size: int = 16
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    max_steps: int = 0  # 0: one pass over the blocks
    seed: int = 0
    log_every: int = 50


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer: ``<|endoftext|>`` is id 0 and serves as bos, eos and unk."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text can be encoded
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        model_max_length=PretrainConfig.n_positions,
    )


def pack_documents(tokenizer, documents: list[str], block_size: int) -> torch.Tensor:
    """Concatenate ``doc_1 <eos> doc_2 <eos> ...`` and cut into rows: ``(num_blocks, block_size)``."""
    ids = []
    for encoding in tokenizer(documents)["input_ids"]:
        ids.extend(encoding + [tokenizer.eos_token_id])
    num_blocks = len(ids) // block_size  # the ragged tail is dropped
    return torch.tensor(ids[: num_blocks * block_size]).view(num_blocks, block_size)


def build_model(config: PretrainConfig, tokenizer) -> GPT2LMHeadModel:
    model_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # one pass over the data: nothing to regularise
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(model_config)


def get_lr(step: int, max_steps: int, config: PretrainConfig) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_learning_rate`` (as in nanoGPT)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    coefficient = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # 1 -> 0
    return config.min_learning_rate + coefficient * (config.learning_rate - config.min_learning_rate)


def make_optimizer(model, config: PretrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (dim >= 2, the tied embedding included), none on biases and LayerNorms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over all blocks (every block has the same number of targets)."""
    model.eval()
    losses = [model(input_ids=batch, labels=batch).loss.item() for batch in blocks.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def save(model, tokenizer, output_dir: Path, overwrite: bool = False) -> None:
    """Write into a temporary directory beside ``output_dir``, then swap it in, so a crash never leaves half a
    model behind (:func:`~minipeft.files.safe_files.write_directory_atomically`); an existing ``output_dir`` is
    replaced only with ``overwrite`` and only when minipeft wrote it and every file in it."""
    check_output_directory(output_dir, "--output_dir", overwrite)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,  # generate() needs one for batches; the tokenizer has none
    )

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    write_directory_atomically(output_dir, write, "--output_dir")


def pretrain(config: PretrainConfig, output_dir: Path, overwrite: bool = False) -> float:
    """Run the whole recipe; returns the final held-out loss (nats per token). ``output_dir`` is checked
    first (see :func:`save`), so minutes of training never end in a refusal."""
    output_dir = Path(output_dir)
    check_output_directory(output_dir, "--output_dir", overwrite)
    start = time.time()
    torch.manual_seed(config.seed)
    documents = generate_corpus(config.num_documents, seed=config.seed)
    heldout = generate_corpus(config.heldout_documents, seed=config.seed + 1)
    tokenizer = train_tokenizer(documents, config.vocab_size)
    blocks = pack_documents(tokenizer, documents, config.block_size)
    heldout_blocks = pack_documents(tokenizer, heldout, config.block_size)
    print(f"corpus: {len(documents)} documents, {blocks.numel():,} tokens in {len(blocks)} blocks of "
          f"{config.block_size}; vocabulary {len(tokenizer)}; {time.time() - start:.1f}s", flush=True)

    model = build_model(config, tokenizer)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2, {config.n_layer} layers, n_embd {config.n_embd}, {config.n_head} heads, "
          f"{num_parameters:,} parameters", flush=True)
    optimizer = make_optimizer(model, config)
    order = torch.randperm(len(blocks))  # seeded by manual_seed above
    steps_per_pass = len(blocks) // config.batch_size
    max_steps = config.max_steps or steps_per_pass
    print(f"step 0: held-out loss {evaluate(model, heldout_blocks, 64):.3f}", flush=True)

    model.train()
    running_loss = 0.0
    for step in range(max_steps):
        lr = get_lr(step, max_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = (step % steps_per_pass) * config.batch_size
        batch = blocks[order[first: first + config.batch_size]]  # (B, T); labels are shifted inside the model
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running_loss += loss.item()
        if (step + 1) % config.log_every == 0:
            print(f"step {step + 1}/{max_steps}: train loss {running_loss / config.log_every:.3f}, "
                  f"lr {lr:.2e}, {time.time() - start:.0f}s", flush=True)
            running_loss = 0.0

    heldout_loss = evaluate(model, heldout_blocks, 64)
    print(f"done: held-out loss {heldout_loss:.3f} (perplexity {math.exp(heldout_loss):.2f}), "
          f"{time.time() - start:.0f}s", flush=True)
    save(model, tokenizer, output_dir, overwrite)
    print(f"saved to {output_dir}")
    return heldout_loss

