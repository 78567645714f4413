"""The KV-cached generate loop equals recomputing the whole sequence each step, for every kind of method,
on GPT-2 and on a grouped-query Llama, batched with left padding."""

import pytest
import torch

from minipeft import LoRAConfig, UserError, get_peft_model
from minipeft.core.generation import generate, next_token_from_logits
from minipeft.methods.prefix import PrefixTuningConfig
from minipeft.methods.prompt import PromptTuningConfig

METHOD_CONFIGS = {
    "plain": lambda: None,
    "lora": lambda: LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "q_proj", "v_proj"],
                               init_lora_weights=False),  # B random: the adapter changes the outputs
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=4),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4),
}


def lively(model):
    """Random tiny models with tied embeddings mostly repeat their last token; larger weights make the
    greedy path change from step to step, so the comparison checks real decisions."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(6)
    return model


def build(factory, method):
    base = lively(factory())
    config = METHOD_CONFIGS[method]()
    if config is None:
        return base
    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    if isinstance(config, LoRAConfig):
        config.target_modules = [t for t in config.target_modules if t in present]
    torch.manual_seed(1)
    return get_peft_model(base, config)


def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference: one unpadded row, the whole sequence recomputed each step, argmax of the last logits."""
    sequence = prompt[None]  # (1, T)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits  # (1, ., V)
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence[0, prompt.shape[0]:]


def left_padded(rows, pad_id=0):
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


PROMPTS = [torch.tensor([5, 17, 256, 3, 999, 42, 8]), torch.tensor([700, 11, 64]), torch.tensor([123, 321, 9, 77])]


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_cached_batched_generation_equals_greedy_without_cache(tiny_model_factory, method):
    model = build(tiny_model_factory, method)
    model.eval()
    input_ids, attention_mask = left_padded(PROMPTS)
    generated = generate(model, input_ids, attention_mask, max_new_tokens=10)
    assert generated.shape == (3, 10)
    for row, prompt in enumerate(PROMPTS):
        expected = greedy_without_cache(model, prompt, 10)
        assert generated[row].tolist() == expected.tolist(), f"row {row}"
        alone = generate(model, prompt[None], max_new_tokens=10)
        assert alone[0].tolist() == expected.tolist()
    assert len(set(generated.flatten().tolist())) > 3  # the paths really change (not one repeated token)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generation_returns_only_new_tokens_and_uses_the_adapter(tiny_model_factory, method):
    model = build(tiny_model_factory, method)
    input_ids, attention_mask = left_padded(PROMPTS)
    with_adapter = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6)
    with model.disable_adapters():
        without = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6)
    assert with_adapter.shape == without.shape == (3, 6)
    assert not torch.equal(with_adapter, without)
    assert torch.equal(without, generate(model.base_model, input_ids, attention_mask, max_new_tokens=6))


def test_rows_stop_at_eos_and_are_padded(gpt2_tiny):
    model = lively(gpt2_tiny)
    input_ids, attention_mask = left_padded(PROMPTS)
    free = generate(model, input_ids, attention_mask, max_new_tokens=8)
    eos = int(free[1, 2])  # row 1 produces it at step 2 (and maybe other rows elsewhere)
    stopped = generate(model, input_ids, attention_mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=-1)
    for row in range(3):
        tokens = free[row].tolist()
        end = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        assert stopped[row, :end].tolist() == tokens[:end]
        assert (stopped[row, end:] == -1).all()
    assert stopped.shape[1] <= 8


def test_loop_ends_when_every_row_is_done(gpt2_tiny):
    model = lively(gpt2_tiny)
    free = generate(model, PROMPTS[0][None], max_new_tokens=8)
    stopped = generate(model, PROMPTS[0][None], max_new_tokens=8, eos_token_id=[int(free[0, 3]), 99999])
    assert stopped.shape == (1, free[0].tolist().index(int(free[0, 3])) + 1)


def test_streamer_sees_every_step(gpt2_tiny):
    model = lively(gpt2_tiny)
    input_ids, attention_mask = left_padded(PROMPTS)
    steps = []
    generated = generate(model, input_ids, attention_mask, max_new_tokens=5, streamer=steps.append)
    assert torch.equal(torch.stack(steps, dim=1), generated)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama_tiny):
    model = lively(llama_tiny)
    input_ids, attention_mask = left_padded(PROMPTS)
    greedy = generate(model, input_ids, attention_mask, max_new_tokens=6)
    first = generate(model, input_ids, attention_mask, max_new_tokens=6, do_sample=True, temperature=2.0,
                     generator=torch.Generator().manual_seed(3))
    second = generate(model, input_ids, attention_mask, max_new_tokens=6, do_sample=True, temperature=2.0,
                      generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert not torch.equal(first, greedy)
    top1 = generate(model, input_ids, attention_mask, max_new_tokens=6, do_sample=True, top_k=1,
                    generator=torch.Generator().manual_seed(4))
    assert torch.equal(top1, greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(next_token_from_logits(logits, True, top_p=0.8, generator=generator)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are never drawn
    draws = {int(next_token_from_logits(logits, True, top_p=0.81, generator=generator)) for _ in range(300)}
    assert draws == {0, 1, 2}
    draws = {int(next_token_from_logits(logits, True, top_p=0.1, generator=generator)) for _ in range(50)}
    assert draws == {0}


def test_modes_are_restored(gpt2_tiny):
    model = get_peft_model(gpt2_tiny, PromptTuningConfig(num_virtual_tokens=2))
    model.train()
    model.base_model.transformer.h[0].eval()
    generate(model, PROMPTS[0][None], max_new_tokens=2)
    assert model.training and model.base_model.training and not model.base_model.transformer.h[0].training


@pytest.mark.parametrize("settings, flag", [
    (dict(max_new_tokens=-1), "--max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "--temperature"),
    (dict(top_p=0.0), "--top_p"),
    (dict(top_k=-2), "--top_k"),
])
def test_bad_settings_are_user_errors(gpt2_tiny, settings, flag):
    with pytest.raises(UserError, match=flag):
        generate(gpt2_tiny, PROMPTS[0][None], **settings)


def test_right_padding_is_refused(gpt2_tiny):
    input_ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    with pytest.raises(UserError, match="left"):
        generate(gpt2_tiny, input_ids, torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=2)


def test_zero_new_tokens(gpt2_tiny):
    assert generate(gpt2_tiny, PROMPTS[0][None], max_new_tokens=0).shape == (1, 0)


def test_plain_model_matches_transformers_generate(tiny_model_factory):
    model = lively(tiny_model_factory())
    input_ids, attention_mask = left_padded(PROMPTS)
    ours = generate(model, input_ids, attention_mask, max_new_tokens=8)
    theirs = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, min_new_tokens=8,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs[:, input_ids.shape[1]:])


def test_a_model_whose_output_is_not_finite_is_an_error_not_an_empty_reply(gpt2_tiny):
    """A huge lora_alpha (or a damaged weight) makes the logits NaN; argmax then picks token 0 and the reply was
    empty with exit 0."""
    peft_model = get_peft_model(lively(gpt2_tiny), LoRAConfig(r=2, lora_alpha=1e38, target_modules=["c_attn"],
                                                              init_lora_weights=False))
    input_ids, attention_mask = left_padded(PROMPTS)
    with pytest.raises(UserError, match="output is not finite .* at generated token 1"):
        generate(peft_model, input_ids, attention_mask, max_new_tokens=4)
