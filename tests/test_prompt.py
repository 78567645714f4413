"""Prompt tuning: inputs_embeds = cat(P, wte(ids)), its inits, counts, training, files, padding and
gradient checkpointing; on GPT-2 and on a grouped-query Llama."""

import json

import pytest
import torch

from minipeft import UserError, get_peft_model, load_adapter
from minipeft.loading.models import build_from_known_config
from minipeft.methods.prompt import PromptTuningConfig
from minipeft.core.transformers_api import enable_activation_checkpointing

TOKENS = torch.tensor([[5, 17, 256, 3, 999, 42, 8], [700, 11, 64, 1, 2, 3, 4]])


def without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def train_steps(model, steps=5, lr=0.1):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=TOKENS, attention_mask=torch.ones_like(TOKENS), labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_parameter_count_is_n_times_d(tiny_model_factory):
    base = tiny_model_factory()
    base_total = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=7))
    assert model.peft_config.token_dim == 64
    assert model.parameter_stats().trainable == 7 * 64
    assert model.parameter_stats().total == base_total + 7 * 64
    assert model.adapter_parameter_names == ["prompt_encoder.embedding.weight"]


def test_gpt2_small_and_smollm2_counts():
    with torch.device("meta"):  # shapes only: instant, and the same counts
        gpt2 = build_from_known_config("gpt2")
        smollm2 = build_from_known_config("smollm2-135m")
    stats = get_peft_model(gpt2, PromptTuningConfig(num_virtual_tokens=20)).parameter_stats()
    assert (stats.trainable, stats.total) == (20 * 768, 124_455_168)
    model = get_peft_model(smollm2, PromptTuningConfig(num_virtual_tokens=20))
    assert (model.peft_config.token_dim, model.peft_config.num_layers, model.peft_config.num_attention_heads) == (
        576, 30, 9)
    assert model.parameter_stats().trainable == 20 * 576


def test_virtual_tokens_are_input_embeddings_in_front(tiny_model_factory):
    base = tiny_model_factory()
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=3))
    prompt = model.prompt_encoder.embedding.weight  # (3, d)
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(TOKENS)], dim=1)  # (2, 3 + T, d)
    expected = base(inputs_embeds=embeds)
    output = model(input_ids=TOKENS, labels=TOKENS)
    assert output.logits.shape == (2, 3 + TOKENS.shape[1], 1000)  # n + T positions, as in peft
    torch.testing.assert_close(output.logits, expected.logits)
    # labels get n × -100 in front: the last virtual token predicts the first real one, then as usual
    logits = expected.logits[:, 2:-1]  # (2, T, V)
    manual_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), TOKENS.reshape(-1))
    torch.testing.assert_close(output.loss, manual_loss)


def test_text_init_copies_the_texts_embeddings_repeated(gpt2_tiny):
    wte = gpt2_tiny.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(gpt2_tiny, PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                                         prompt_tuning_init_token_ids=[4, 8, 15]))
    assert torch.equal(model.prompt_encoder.embedding.weight, wte[[4, 8, 15, 4, 8, 15, 4]])
    model = get_peft_model(gpt2_tiny, PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                                         prompt_tuning_init_token_ids=[4, 8, 15]))
    assert torch.equal(model.prompt_encoder.embedding.weight, wte[[4, 8]])


def test_sample_vocab_init_copies_random_vocabulary_rows_reproducibly(llama_tiny):
    wte = llama_tiny.get_input_embeddings().weight.detach()
    torch.manual_seed(3)
    first = get_peft_model(llama_tiny, PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"))
    torch.manual_seed(3)
    second = get_peft_model(llama_tiny, PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = first.prompt_encoder.embedding.weight
    assert torch.equal(rows, second.prompt_encoder.embedding.weight)
    for row in rows:
        assert (wte == row).all(dim=-1).any()  # every row is some token's embedding


def test_random_init_is_standard_normal(gpt2_tiny):
    weight = get_peft_model(gpt2_tiny, PromptTuningConfig(num_virtual_tokens=40)).prompt_encoder.embedding.weight
    assert 0.9 < weight.std().item() < 1.1 and abs(weight.mean().item()) < 0.1


@pytest.mark.parametrize("settings, message", [
    (dict(prompt_tuning_init="TEXT"), "^prompt_tuning_init TEXT needs prompt_tuning_init_text"),
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_token_ids=[5, 1000]), "token id 1000 is outside"),
    (dict(prompt_tuning_init="WORDS"), "^prompt_tuning_init must be one of RANDOM, TEXT, SAMPLE_VOCAB"),
    (dict(num_virtual_tokens=0), "^num_virtual_tokens must be a positive integer"),
])
def test_bad_settings_are_user_errors(gpt2_tiny, settings, message):
    with pytest.raises(UserError, match=message):
        get_peft_model(gpt2_tiny, PromptTuningConfig(**settings))


def test_disabled_adapter_gives_the_base_model(tiny_model_factory):
    base_logits = tiny_model_factory()(input_ids=TOKENS).logits
    model = get_peft_model(tiny_model_factory(), PromptTuningConfig(num_virtual_tokens=4))
    assert not torch.allclose(model(input_ids=TOKENS).logits[:, 4:], base_logits, atol=1e-3)
    with model.disable_adapters():
        assert torch.equal(model(input_ids=TOKENS).logits, base_logits)


def test_training_lowers_the_loss_and_touches_only_the_prompt(tiny_model_factory):
    model = get_peft_model(without_dropout(tiny_model_factory()), PromptTuningConfig(num_virtual_tokens=4))
    frozen = {name: p.detach().clone() for name, p in model.base_model.named_parameters()}
    losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[name]) for name, p in model.base_model.named_parameters())


def test_left_and_right_padding_give_each_row_its_unpadded_logits(tiny_model_factory):
    model = get_peft_model(tiny_model_factory(), PromptTuningConfig(num_virtual_tokens=3)).eval()
    rows = [[5, 17, 256, 3, 999], [700, 11], [64, 1, 2]]
    width = max(len(row) for row in rows)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row])).logits[0, 3:] for row in rows]
        for side in ("left", "right"):
            input_ids = torch.zeros((3, width), dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, row in enumerate(rows):
                columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
                input_ids[i, columns], attention_mask[i, columns] = torch.tensor(row), 1
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 3:]  # real columns
            for i in range(3):
                torch.testing.assert_close(logits[i][attention_mask[i].bool()], alone[i], atol=1e-5, rtol=1e-5)


def test_save_load_gives_identical_logits_and_training_continues(tiny_model_factory, tmp_path):
    model = get_peft_model(without_dropout(tiny_model_factory()), PromptTuningConfig(
        num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_token_ids=[3, 4]))
    train_steps(model, steps=2)
    model.eval()
    expected = model(input_ids=TOKENS).logits
    model.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["token_dim"]) == ("PROMPT_TUNING", 4, 64)

    # peft's config has no field for the init's token ids: they are kept in our own block, not at the top level
    assert "prompt_tuning_init_token_ids" not in config and config["minipeft"]["prompt_tuning_init_token_ids"] == [3, 4]
    assert load_adapter(tiny_model_factory(), tmp_path).peft_config.prompt_tuning_init_token_ids == [3, 4]
    # A file written by peft has no token ids for its TEXT init: loading needs none (the file has the weights).
    del config["minipeft"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = load_adapter(tiny_model_factory(), tmp_path)
    assert torch.equal(loaded(input_ids=TOKENS).logits, expected)
    assert loaded.parameter_stats().trainable == 0

    resumed = load_adapter(without_dropout(tiny_model_factory()), tmp_path, is_trainable=True)
    assert resumed.parameter_stats().trainable == 4 * 64
    losses = train_steps(resumed, steps=4)
    assert losses[-1] < losses[0]


def test_a_wrong_tensor_is_a_user_error(llama_tiny):
    model = get_peft_model(llama_tiny, PromptTuningConfig(num_virtual_tokens=4))
    with pytest.raises(UserError, match=r"f.safetensors: tensor prompt_embeddings has shape \[4, 32\]"):
        model.prompt_encoder.load_peft_state_dict({"prompt_embeddings": torch.zeros(4, 32)}, "f.safetensors")
    with pytest.raises(UserError, match="tensor prompt_embeddings is missing"):
        model.prompt_encoder.load_peft_state_dict({}, "f.safetensors")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_factory, use_reentrant):
    gradients = []
    for checkpointing in (False, True):
        model = get_peft_model(without_dropout(tiny_model_factory()), PromptTuningConfig(num_virtual_tokens=3))
        torch.manual_seed(0)
        with torch.no_grad():
            model.prompt_encoder.embedding.weight.normal_()
        if checkpointing:
            enable_activation_checkpointing(model.base_model, use_reentrant=use_reentrant)
        model.train()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        gradients.append(model.prompt_encoder.embedding.weight.grad)
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[0])


def test_packed_batches_are_refused(gpt2_tiny):
    model = get_peft_model(gpt2_tiny, PromptTuningConfig(num_virtual_tokens=2))
    packed_positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])  # two sequences in one row
    with pytest.raises(UserError, match="packed"):
        model(input_ids=TOKENS[:1], position_ids=packed_positions)
