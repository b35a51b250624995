"""Every tested family (Llama 3, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3), as a tiny random model with its real
vocabulary and chat template: packing keeps examples apart (sliding windows included), the response-only head
with the lean norms and MLPs gives the model's own loss (tied embeddings and logit soft-capping included), LoRA
finds the attention projections, 8-bit, 4-bit and DoRA train, and one run trains, generates, serves a multi-turn chat
and exports."""

import json

import openai
import pytest
import torch
from conftest import FAMILIES, chat_template_path, conversations, nudge_lora_b, supports_system, tiny_config

from alpaca_lora.batching import packed_collate, pad_collate
from alpaca_lora.chat_template import end_of_turn_ids, load_chat_template, render
from alpaca_lora.cpu_attention import use_cpu_sdpa
from alpaca_lora.data import IGNORE_INDEX, tokenize_rows
from alpaca_lora.export import ExportConfig, export
from alpaca_lora.gated_mlp import use_lean_gated_mlp
from alpaca_lora.generate import Generator, Sampling
from alpaca_lora.loss import padded_loss, response_only_loss
from alpaca_lora.model import attach_lora, load_model, load_tokenizer, set_pad_token
from alpaca_lora.rms_norm import use_lean_rms_norm
from alpaca_lora.server import Server
from alpaca_lora.train import train

CPU = torch.device("cpu")


def _template(family: str) -> str:
    return chat_template_path(FAMILIES[family][3])


def _rows(family: str) -> list[dict]:
    rows = conversations()
    if not supports_system(FAMILIES[family][3]):
        rows = [{"messages": [m for m in row["messages"] if m["role"] != "system"]} for row in rows]
    return rows


@pytest.fixture(scope="module")
def family_examples(family_base):
    """family -> (tokenizer, chat template, the tokenized test conversations)."""
    made = {}

    def examples(family: str):
        if family not in made:
            tokenizer = load_tokenizer(str(family_base(family)))
            chat = load_chat_template(_template(family), tokenizer)
            set_pad_token(tokenizer, end_of_turn_ids(chat, tokenizer), family)
            made[family] = tokenizer, chat, tokenize_rows(_rows(family), tokenizer, chat, 1024, False).examples
        return made[family]
    return examples


def _lora(folder, quantization=None, use_dora=False, target_modules=None):
    torch.manual_seed(0)
    model = attach_lora(load_model(str(folder), quantization, False, CPU), r=4, alpha=8, dropout=0.0,
                        target_modules=target_modules, use_dora=use_dora, use_rslora=False,
                        gradient_checkpointing=False, quantization=quantization)
    return nudge_lora_b(model)


def _use_lean_activations(model) -> None:
    """As training does; every RMSNorm and MLP of the family is one that LeanRMSNorm and LeanGated know, and every
    family on SDPA (all but Gemma 2, whose attention logits are capped) passes its grouped key/value heads through."""
    norms = sum(type(module).__name__.endswith("RMSNorm") for module in model.modules())
    mlps = sum(type(module).__name__.endswith("MLP") for module in model.modules())
    assert use_lean_rms_norm(model) == norms > 0 and use_lean_gated_mlp(model) == mlps > 0
    base = model.get_base_model()
    assert use_cpu_sdpa(base) == (base.config.model_type != "gemma2")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_packed_example_gets_the_logits_it_gets_alone(family, family_base, family_examples):
    from transformers import AutoModelForCausalLM

    tokenizer, _, examples = family_examples(family)
    window = getattr(AutoModelForCausalLM.from_pretrained(family_base(family)).config, "sliding_window", None)
    assert window is None or max(len(e.input_ids) for e in examples) > 2 * window  # the window is exercised
    base = load_model(str(family_base(family)), None, False, CPU).eval()
    rows = [examples[:2], examples[2:]]
    batch = packed_collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = base(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                alone = base(input_ids=torch.tensor([example.input_ids.tolist()]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, start:start + len(example.input_ids)], alone, rtol=1e-5,
                                           atol=1e-5)
                start += len(example.input_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_response_only_head_gives_the_models_own_loss_and_gradients(family, family_base, family_examples):
    tokenizer, _, examples = family_examples(family)
    model = _lora(family_base(family))
    config = model.get_base_model().config

    def loss_and_grads(loss_sum, batch):
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    standard_loss, standard_grads = loss_and_grads(padded_loss, pad_collate(examples, tokenizer.pad_token_id))
    _use_lean_activations(model)  # ours, as training runs it
    loss, grads = loss_and_grads(response_only_loss, packed_collate([examples[:2], examples[2:]], tokenizer.pad_token_id))
    torch.testing.assert_close(loss, standard_loss, rtol=1e-5, atol=0)
    for name in grads:
        assert (grads[name] - standard_grads[name]).norm() / standard_grads[name].norm() < 1e-5, name
    head, embeddings = model.get_base_model().get_output_embeddings(), model.get_base_model().get_input_embeddings()
    assert (head.weight is embeddings.weight) == bool(config.tie_word_embeddings)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:  # the cap changes the loss 10x more than the tolerance above: leaving it out would be caught
        config.final_logit_softcapping = None
        try:
            uncapped = response_only_loss(model, packed_collate([examples], tokenizer.pad_token_id)).item()
        finally:
            config.final_logit_softcapping = cap
        assert abs(uncapped - standard_loss.item()) > 1e-4 * standard_loss.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_the_attention_projections_that_exist(family, family_base):
    model = _lora(family_base(family))
    adapted = sorted({name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name})
    assert adapted == (["qkv_proj"] if family == "phi3" else ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"--lora_target_modules wq: wq matches no linear layer of this model; its "
                                         r"linear layers are .*o_proj"):
        _lora(family_base(family), target_modules=["wq"])


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_once_and_a_pad_that_never_looks_like_a_stop(family, family_examples):
    tokenizer, chat, examples = family_examples(family)
    stops = end_of_turn_ids(chat, tokenizer)
    assert tokenizer.pad_token_id not in stops and tokenizer.eos_token_id in stops
    for example in examples:
        ids = example.input_ids.tolist()
        assert ids.count(tokenizer.bos_token_id) == (0 if family in ("qwen2", "qwen3") else 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["8bit", "4bit", "dora"])
def test_8bit_4bit_and_dora_train_the_adapter(family, variant, family_base, family_examples):
    tokenizer, _, examples = family_examples(family)
    quantization = None if variant == "dora" else variant
    model = _lora(family_base(family), quantization=quantization, use_dora=variant == "dora")
    _use_lean_activations(model)
    loss = response_only_loss(model, packed_collate([examples], tokenizer.pad_token_id))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_model_trains_generates_serves_and_exports_a_conversation(family, family_base, tmp_path):
    """One command each: train on multi-turn chat data, then the adapter alone renders prompts exactly as training
    did (generate and the server), stops at the end-of-turn token, and the merged export carries the template."""
    data = tmp_path / "chat.jsonl"
    rows = _rows(family) * 4
    data.write_text("\n".join(json.dumps(row) for row in rows))
    result = train(tiny_config(family_base(family), data, tmp_path / "adapter", val_set_size=0, batch_size=4,
                               micro_batch_size=2, max_steps=2, cutoff_len=256, chat_template=_template(family)))
    adapter = tmp_path / "adapter"
    assert {"chat_template.jinja", "generation_config.json"} <= {p.name for p in adapter.iterdir()}
    assert result.summary.chat_template["source"] == (adapter / "chat_template.jinja").read_text()

    generator = Generator(lora_weights=str(adapter), bf16=False, device="cpu")
    tokenizer, chat = generator.tokenizer, generator.chat_template
    stops = json.loads((adapter / "generation_config.json").read_text())["eos_token_id"]
    assert generator.stop_ids == stops == end_of_turn_ids(chat, tokenizer) and len(stops) >= 1
    conversation = _rows(family)[1]["messages"]  # with a system message where the template has the role
    trained = tokenize_rows([{"messages": conversation}], tokenizer, chat, 1024, False).examples[0]
    targets = trained.targets.tolist()
    last_answer = max(i for i in range(1, len(targets)) if targets[i] != IGNORE_INDEX and targets[i - 1] == IGNORE_INDEX)
    prompt = generator.conversation_ids(conversation[:-1])
    assert prompt == trained.input_ids.tolist()[:last_answer + 1]

    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    expected = generator.answer([prompt], greedy)[0]
    running = Server(generator, "127.0.0.1", 0, max_tokens_cap=64, default_sampling=greedy).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{running.port}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="x", messages=conversation[:-1], temperature=0, max_tokens=8)
    finally:
        running.stop()
    assert reply.choices[0].message.content == expected.text and reply.usage.prompt_tokens == len(prompt)

    export(ExportConfig(lora_weights=str(adapter), output_dir=str(tmp_path / "merged"), dtype="float32"),
           write=lambda *args, **kwargs: None)
    from transformers import AutoTokenizer, GenerationConfig

    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tokenizer.apply_chat_template(conversation, tokenize=False) == \
        render(chat, tokenizer, conversation)
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == stops
