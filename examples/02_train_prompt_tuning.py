"""Train a prompt-tuning adapter on the built-in instruction data, with a training loop you can read.

    python examples/02_train_prompt_tuning.py

Only 8 virtual-token embeddings (8 x 160 numbers) train; the built-in GPT-2 stays frozen. The full loop, with
accumulation, schedules, evaluation and checkpoints, is `python train_llm.py --modification_type prompt`;
docs/methods/prompt.md and docs/training.md explain both.
"""

import tempfile

import torch

from minipeft import get_peft_model, load_adapter, load_model_and_tokenizer
from minipeft.data import DataConfig, build_dataloaders, encode_prompt
from minipeft.methods.prompt import PromptTuningConfig
from minipeft.training import causal_lm_loss_sum

torch.manual_seed(0)
model, tokenizer = load_model_and_tokenizer("builtin")
init_text = "Answer the question:"                    # the prompt starts as these words' embeddings
config = PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT", prompt_tuning_init_text=init_text,
                            prompt_tuning_init_token_ids=tokenizer(init_text, add_special_tokens=False)["input_ids"])
peft_model = get_peft_model(model, config)
peft_model.print_trainable_parameters()
frozen_before = model.transformer.h[0].attn.c_attn.weight.detach().clone()

# The built-in data set, Alpaca template, loss on the response only (the prompt's labels are -100).
data = DataConfig(batch_size=16, max_length=128, val_size=64, cache_dir=None)
train_loader, val_loader, report = build_dataloaders(data, tokenizer, progress=False)
print(report.summary_lines()[0])


def validation_loss() -> float:
    """Mean NLL per target token over the whole validation set (not a mean of batch means)."""
    nll, tokens = 0.0, 0
    peft_model.eval()
    with torch.no_grad():
        for batch in val_loader:
            batch_nll, batch_tokens = causal_lm_loss_sum(peft_model, batch)  # labels shifted in here, once
            nll, tokens = nll + batch_nll.item(), tokens + batch_tokens.item()
    peft_model.train()
    return nll / tokens


before = validation_loss()
trainable = [p for p in peft_model.parameters() if p.requires_grad]   # just the (8, 160) prompt
optimizer = torch.optim.AdamW(trainable, lr=0.3, weight_decay=0.0)     # 10x the 3e-2 default: 30 steps only
peft_model.train()
for step, batch in zip(range(1, 31), train_loader):                   # 30 steps of 16 records
    nll_sum, n_targets = causal_lm_loss_sum(peft_model, batch)
    loss = nll_sum / n_targets
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 10 == 0:
        print(f"step {step:2d} | loss {loss.item():.3f}")
after = validation_loss()
print(f"validation loss per target token: {before:.3f} before, {after:.3f} after")
assert after < before, "training did not lower the validation loss"
assert torch.equal(model.transformer.h[0].attn.c_attn.weight, frozen_before), "the base model changed"

# Generate with the same template the data used; the virtual tokens go in front inside PeftModel.
prompt = torch.tensor([encode_prompt("What is the capital of France?", "", "alpaca", tokenizer)])
reply = peft_model.generate(prompt, max_new_tokens=16, eos_token_id=tokenizer.eos_token_id)[0]
with peft_model.disable_adapters():
    base_reply = peft_model.generate(prompt, max_new_tokens=16, eos_token_id=tokenizer.eos_token_id)[0]
print("base model:   ", repr(tokenizer.decode(base_reply, skip_special_tokens=True)))
print("with adapter: ", repr(tokenizer.decode(reply, skip_special_tokens=True)))

# The adapter file holds one tensor, (8, 160), in peft's format; loading it gives the same model.
with tempfile.TemporaryDirectory() as directory:
    peft_model.save_adapter(directory)
    loaded = load_adapter(load_model_and_tokenizer("builtin")[0], directory)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=16, eos_token_id=tokenizer.eos_token_id)[0], reply)
print("saved, reloaded onto a fresh base model: the same reply")
