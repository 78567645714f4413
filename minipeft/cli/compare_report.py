"""The report of ``python -m minipeft compare``: the Markdown table, the plot and the whole page.

:mod:`minipeft.cli.compare` runs the methods and hands each method's row (a dict: trainable parameters,
times, losses, sizes, speeds, generations) to these functions; they only format, never measure.

Columns of the table (``comparison.md``, ``comparison.json``, and ``comparison.png`` with matplotlib):

- trainable parameters and their share of the total (tied weights counted once);
- train time: seconds spent in training steps (evaluation excluded); peak memory: the process's peak
  resident memory during this method's run on CPU (Linux resets the high-water mark between methods through
  ``/proc/self/clear_refs``), or the peak CUDA allocation on a GPU. Either includes the untouched base model
  that the comparison keeps for the next method (one model's size more than a single training run needs), so
  compare the differences between rows;
- train loss: mean over the last 10 steps (token-weighted); eval loss before → after, eval perplexity
  ``exp(total NLL / target tokens)`` after;
- adapter size on disk (``adapter_model.safetensors`` + config);
- generation tokens/s, unmerged and merged.

``--report PATH`` (default ``report.md`` in ``--output_dir``; an existing page only with ``--overwrite``, and
only one minipeft wrote: this header comment or its ``.NAME.minipeft`` record says so) also writes the whole page: the command, its
wall time and machine, the settings, the table and the generations. ``docs/comparison.md`` is such a page.
"""

from pathlib import Path

import torch

from minipeft.files.safe_files import write_file_atomically


# --- the table --------------------------------------------------------------------------------------------------

def _number(value, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} kB"


def markdown_table(rows: list) -> str:
    header = ("| method | trainable params | trainable % | train time (s) | peak memory (MB) | train loss | "
              "eval loss (before → after) | eval ppl | adapter size | gen tok/s unmerged | gen tok/s merged |")
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['trainable_params']:,} | {row['trainable_percent']:.3f} | "
            f"{row['train_seconds']:.1f} | {_number(row['peak_memory_mb'], ',.0f')} | "
            f"{_number(row['train_loss'], '.3f')} | {_number(row['eval_loss_before'], '.3f')} → "
            f"{_number(row['eval_loss'], '.3f')} | {_number(row['eval_perplexity'], '.2f')} | "
            f"{_size(row['adapter_bytes'])} | {row['tokens_per_s_unmerged']:.1f} | "
            f"{_number(row['tokens_per_s_merged'], '.1f')} |")
    return "\n".join(lines)


def plot_comparison(rows: list, path: Path):
    """Four bar charts (eval loss, trainable parameters, train time, generation speed); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot: matplotlib is not installed (pip install 'minipeft[plot]')")
        return None
    names = [row["method"] for row in rows]
    positions = range(len(rows))
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.bar([p - 0.2 for p in positions], [row["eval_loss_before"] or 0 for row in rows], 0.4, label="before")
    ax.bar([p + 0.2 for p in positions], [row["eval_loss"] or 0 for row in rows], 0.4, label="after")
    ax.set_title("eval loss"), ax.legend()
    ax = axes[0][1]
    ax.bar(positions, [row["trainable_params"] for row in rows])
    ax.set_yscale("log"), ax.set_title("trainable parameters (log scale)")
    ax = axes[1][0]
    ax.bar(positions, [row["train_seconds"] for row in rows])
    ax.set_title("train time (s)")
    ax = axes[1][1]
    ax.bar([p - 0.2 for p in positions], [row["tokens_per_s_unmerged"] for row in rows], 0.4, label="unmerged")
    ax.bar([p + 0.2 for p in positions], [row["tokens_per_s_merged"] or 0 for row in rows], 0.4, label="merged")
    ax.set_title("generation tokens/s (batch 1)"), ax.legend()
    for ax in axes.flat:
        ax.set_xticks(list(positions), names, rotation=30)
    figure.tight_layout()
    write_file_atomically(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)
    return path


def markdown_report(result: dict) -> str:
    """The whole comparison as a Markdown page: command, wall time, settings, table, generations."""
    settings, rows = result["settings"], result["rows"]
    lines = [
        f"# PEFT methods compared on {settings['model']}",
        "",
        "<!-- Written by `python -m minipeft compare --report`; rerun the command below instead of editing. -->",
        "",
        f"Every method below was applied to a fresh copy of `{settings['model']}` and trained on the same batches, "
        f"with the same seed and budget, by this command ({settings['wall_minutes']:.1f} minutes of wall time on "
        f"{settings['machine']}):",
        "",
        "```bash",
        settings["command"],
        "```",
        "",
        f"{settings['train_records']} training and {settings['eval_records']} held-out records "
        f"(`{settings['dataset_path'] or 'built-in data'}`), template `{settings['template']}`, max_length "
        f"{settings['max_length']}, {settings['max_steps']} optimizer steps of {settings['batch_size']} records, "
        f"precision {settings['precision']}, seed {settings['seed']}. Each method trains at its default learning "
        "rate (each method's module in `minipeft/methods/`, the same as `train_llm.py`'s) unless the command sets one.",
        "",
        "| method | learning rate |",
        "|---|---|",
        *[f"| {row['method']} | {row['learning_rate']:g} |" for row in rows],
        "",
        "## The table",
        "",
        markdown_table(rows),
        "",
        "Train time counts training steps only; peak memory includes the base model kept for the next method; "
        "train loss is the token-weighted mean of the last 10 steps; adapter size is the saved directory; "
        "generation speed is greedy, KV-cached, batch 1. One seed and a short budget: the table shows what each "
        "method costs and how fast it starts to learn, not which one is best after a full training run.",
    ]
    prompts = result.get("prompts") or []
    if prompts:
        lines += ["", "## Generations on held-out prompts", "",
                  f"Greedy, at most {settings['generation_tokens']} new tokens, template `{settings['template']}`: "
                  "the base model before training, then each method after it.", ""]
        for index, prompt in enumerate(prompts):
            lines += [f"### {index + 1}. {' '.join(prompt['instruction'].split())}", ""]
            if prompt["input"]:
                lines += [f"Input: {' '.join(prompt['input'].split())}", ""]
            lines += [f"Reference: {' '.join(prompt['reference'].split())}", "", "| model | reply |", "|---|---|"]
            replies = [("base model (before)", prompt["base_reply"])]
            replies += [(f"{row['method']} (after)", row["generations"][index]) for row in rows if row["generations"]]
            lines += [f"| {who} | {reply.replace('|', '&#124;') or '(empty)'} |" for who, reply in replies]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def describe_machine(device: torch.device) -> str:
    """``"2 CPU cores (Intel ...), 2 torch threads"`` or the GPU's name: where the wall time was measured."""
    import os
    import platform

    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model}), {torch.get_num_threads()} torch threads"
