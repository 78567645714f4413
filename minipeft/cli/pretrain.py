"""``python -m minipeft pretrain``: pretrain the built-in tiny GPT-2 from scratch
(:mod:`minipeft.pretraining.pretrain`)."""

from pathlib import Path

from minipeft.builtin import MODEL_DIR
from minipeft.pretraining.pretrain import PretrainConfig, pretrain
from minipeft.cli import CommandLineParser
from minipeft.core.bounds import check_allocation, path_name
from minipeft.core.errors import UserError

# Memory per corpus document: ~230 bytes of text objects at the peak of generating it (measured, 160 characters
# on average), several times that while the tokenizer trains on it and its ids are packed: 2 kB is generous.
BYTES_PER_DOCUMENT = 2_000


def main(argv=None) -> int:
    parser = CommandLineParser(prog="python -m minipeft pretrain",
                               description="Pretrain the built-in tiny GPT-2 from scratch.")
    parser.add_argument("--output_dir", type=path_name, default=str(MODEL_DIR),
                        help="where to save (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output_dir if it exists and minipeft wrote it (and every file in it)")
    parser.add_argument("--max_steps", type=int, default=0, help="stop early after this many steps (0: one pass)")
    parser.add_argument("--num_documents", type=int, default=PretrainConfig.num_documents,
                        help="corpus size in documents (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.max_steps < 0:
        raise UserError(f"--max_steps: must be 0 (one pass) or a positive number of steps, got {args.max_steps}")
    if args.num_documents < 100:
        raise UserError(f"--num_documents: need at least 100 documents to pretrain on, got {args.num_documents}")
    # 10**12 documents would fill the memory one string at a time (minutes, then the OOM killer), not fail
    check_allocation(args.num_documents * BYTES_PER_DOCUMENT, f"--num_documents {args.num_documents}", "the corpus")
    pretrain(PretrainConfig(max_steps=args.max_steps, num_documents=args.num_documents), Path(args.output_dir),
             args.overwrite)
    return 0
