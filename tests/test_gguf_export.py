"""GGUF for every family: llama.cpp itself loads each exported file, tokenizes as the model's tokenizer does, computes
the merged model's logits, and finds the chat template trained with and its end-of-turn token."""

import json

import numpy as np
import pytest
import torch
from conftest import FAMILIES, REPO, chat_template_path, conversations, supports_system, tiny_config

from alpaca_lora.chat_template import bos_ids, prompt_text, render
from alpaca_lora.export import ExportConfig, export
from alpaca_lora.generate import Generator
from alpaca_lora.train import train


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def family_adapter(family_base, tmp_path_factory):
    """family -> an adapter trained 1 step on its tiny base. Sliding windows are made longer than the test's text:
    llama.cpp reads Gemma's window but runs Mistral as LLaMA, without one."""
    adapters = {}

    def adapter(family: str):
        if family not in adapters:
            overrides = {"sliding_window": 1024} if "sliding_window" in FAMILIES[family][1] else {}
            # the real models' logit caps (Gemma 2: 30 and 50, Gemma 3: none): the tiny ones of the training tests
            # squash the logits to +-0.05, where float rounding in the cap alone exceeds the tolerance below
            if family == "gemma2":
                overrides.update(final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
            if family == "gemma3":
                overrides.update(final_logit_softcapping=None)
            folder = tmp_path_factory.mktemp(f"gguf-{family}")
            rows = conversations()
            if not supports_system(FAMILIES[family][3]):
                rows = [{"messages": [m for m in r["messages"] if m["role"] != "system"]} for r in rows]
            (folder / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 4))
            template = chat_template_path(FAMILIES[family][3])
            train(tiny_config(family_base(family, **overrides), folder / "chat.jsonl", folder / "adapter",
                              val_set_size=0, batch_size=4, micro_batch_size=2, max_steps=1, warmup_steps=0,
                              learning_rate=5e-2, cutoff_len=256,
                              chat_template=template))
            adapters[family] = folder / "adapter", rows
        return adapters[family]
    return adapter


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_reads_each_familys_gguf_as_the_merged_model(family, family_adapter, llama_cpp_chat_prompt,
                                                                 tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llama-cpp]'"
                                                        " (builds llama.cpp, about 5 minutes)")
    from transformers import AutoModelForCausalLM

    adapter, rows = family_adapter(family)
    export(ExportConfig(lora_weights=str(adapter), gguf=str(tmp_path / "m.gguf"), gguf_type="f32",
                        output_dir=str(tmp_path / "hf"), dtype="float32"), write=quiet)
    generator = Generator(lora_weights=str(adapter), bf16=False, device="cpu")
    tokenizer = generator.tokenizer
    conversation = rows[1]["messages"]
    prompt = generator.conversation_ids(conversation[:-1])
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=512, logits_all=True, verbose=False, seed=0)
    # the vocabulary: each conversation and each prompt, as a deployment renders them (the template's text, special
    # tokens parsed, BOS added where the model wants one), gives training's ids
    texts = [render(generator.chat_template, tokenizer, row["messages"]) for row in rows]
    texts += [prompt_text(generator.chat_template, tokenizer, row["messages"][:-1]) for row in rows]
    for text in texts:
        expected = bos_ids(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=bool(bos_ids(tokenizer, text)), special=True) == expected, text
    # the weights: llama.cpp's logits at every prompt position are the merged model's
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected_logits = merged(input_ids=torch.tensor([prompt])).logits[0].numpy()
    llm.eval(prompt)
    got = np.asarray(llm.scores[:len(prompt)])
    scale, error = np.abs(expected_logits).max(), np.abs(got - expected_logits).max()
    print(f"{family}: llama.cpp's logits within {error:.2g} of the merged model's (largest {scale:.2g})")
    assert error <= 1e-2 * scale  # a wrong layout or hyperparameter is off by tens of percent
    # the chat template and the token that ends a turn
    metadata = llm.metadata
    assert metadata["tokenizer.chat_template"] == generator.chat_template.source
    assert int(metadata["tokenizer.ggml.eot_token_id"]) == generator.stop_ids[0]
    # llama-server's prompt for each conversation so far (llama.cpp's Jinja engine on the file's template, its BOS
    # rule, its tokenizer) is the one training and our generator use: the turns before each answer
    for messages in (row["messages"] for row in rows):
        for history in (messages[:i] for i, message in enumerate(messages) if message["role"] == "assistant"):
            ids, text = llama_cpp_chat_prompt(tmp_path / "m.gguf", history)
            assert ids == generator.conversation_ids(history), (text, prompt_text(generator.chat_template, tokenizer,
                                                                                 history))


# f32 for every family above; each other type for every family through the whole export, but for the ones with
# 128K-152K vocabularies, where gguf's reader takes ~10-20 s to read a file back: those get q4_k_m this way and
# llama.cpp's other types in the test after this one
LARGE_VOCABULARIES = ("llama3", "qwen2", "qwen3")
OTHER_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
QUANTIZED_CASES = [(family, gguf_type) for family in FAMILIES for gguf_type in OTHER_TYPES
                   if family not in LARGE_VOCABULARIES or gguf_type == "q4_k_m"]


@pytest.mark.slow
@pytest.mark.parametrize("family, gguf_type", QUANTIZED_CASES)
def test_each_type_is_checked_by_llama_cpp_in_the_export_run(family, gguf_type, family_adapter, tmp_path):
    """The export itself has llama.cpp tokenize the held-out conversations, compare an f16 file's logits with base +
    adapter, and bound what a quantized file loses in mean log-probability against the f16 file it was made from."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llama-cpp]'")
    import gguf

    from alpaca_lora.llama_cpp_checks import LOG_PROB_BOUNDS

    adapter, _ = family_adapter(family)
    lines = []
    report = export(ExportConfig(lora_weights=str(adapter), gguf=str(tmp_path / "m.gguf"), gguf_type=gguf_type),
                    write=lines.append)["gguf"]["llama_cpp"]
    said = next(line for line in lines if line.startswith(f"wrote {tmp_path / 'm.gguf'}:"))
    assert report["tokens_checked"] >= 1 and "; llama.cpp: tokenizes" in said
    if gguf_type == "f16":
        assert report["max_logit_error"] >= 0
    if gguf_type in LOG_PROB_BOUNDS:
        assert 0 <= abs(report["log_prob_drop"]) <= report["log_prob_bound"] == LOG_PROB_BOUNDS[gguf_type]
        assert report["mean_log_prob"] < 0 and not (tmp_path / "m.gguf.staging.f16").exists()
    file_type = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents()
    assert file_type == {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[gguf_type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf", "m.md"]  # nothing else left behind
    card = (tmp_path / "m.md").read_text()
    assert f"as a {gguf_type} GGUF file" in card and f"llama.cpp: tokenizes {report['tokens_checked']} texts" in card
    if gguf_type in LOG_PROB_BOUNDS:  # the measured loss of quantization, in the card
        assert f"(a drop of {report['log_prob_drop']:.4f}, allowed {LOG_PROB_BOUNDS[gguf_type]})" in card
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert "FROM ./m.gguf\n" in modelfile and f'PARAMETER stop "{_stop_token(adapter)}"' in modelfile
    # a shipped chat template goes into Ollama's TEMPLATE (Go) translated; a vendor's is left to Ollama
    assert ('TEMPLATE """' in modelfile) == (not FAMILIES[family][3].endswith(".jinja"))


@pytest.mark.slow
@pytest.mark.parametrize("family", LARGE_VOCABULARIES)
def test_llama_cpps_types_of_the_large_vocabulary_families(family, family_adapter, tmp_path, monkeypatch):
    """The export's f16 file of each, quantized to each of llama.cpp's other types and checked as the export checks
    its files (tokens, chat prompts, mean log-probability lost against the f16 file). bf16 and q8_0, which the gguf
    package writes tensor by tensor whatever the family, are tested on the other families only."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llama-cpp]'")
    from alpaca_lora import gguf_export
    from alpaca_lora.llama_cpp_checks import LOG_PROB_BOUNDS, quantize

    adapter, _ = family_adapter(family)
    arguments = []
    real_check = gguf_export._llama_cpp_check

    def keep_arguments(*args):  # the export's own check, made again below for each type
        arguments.extend(args[:-1])
        return real_check(*args)
    monkeypatch.setattr(gguf_export, "_llama_cpp_check", keep_arguments)
    f16 = tmp_path / "m-f16.gguf"
    export(ExportConfig(lora_weights=str(adapter), gguf=str(f16), gguf_type="f16"), write=quiet)
    for gguf_type in ("q4_0", "q5_k_m", "q6_k"):
        quantize(f16, tmp_path / f"m-{gguf_type}.gguf", gguf_type)
        report = real_check(*arguments, gguf_type)(tmp_path / f"m-{gguf_type}.gguf", f16)
        print(f"{family} {gguf_type}: mean log-probability drop {report['log_prob_drop']:.4f} nats")
        assert report["chat_prompts_checked"] >= 1 and abs(report["log_prob_drop"]) <= LOG_PROB_BOUNDS[gguf_type]


def _stop_token(adapter) -> str:
    from transformers import AutoTokenizer, GenerationConfig

    stops = GenerationConfig.from_pretrained(adapter).eos_token_id
    return AutoTokenizer.from_pretrained(adapter).convert_ids_to_tokens(stops[0])


def test_the_demo_alpaca_adapter_gets_a_q4_k_m_file_and_a_modelfile_with_its_prompt(tiny_adapter, tmp_path):
    """The README's deployment command on an Alpaca adapter: llama.cpp's q4_k_m, checked, and a Modelfile whose
    TEMPLATE is the alpaca prompt (Ollama's Go template) and whose stop is EOS."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llama-cpp]'")
    lines = []
    report = export(ExportConfig(lora_weights=str(tiny_adapter), gguf=str(tmp_path / "demo-q4_k_m.gguf"),
                                 gguf_type="q4_k_m"), write=lines.append)["gguf"]
    assert report["llama_cpp"]["log_prob_drop"] <= report["llama_cpp"]["log_prob_bound"]
    modelfile = (tmp_path / "demo-q4_k_m.Modelfile").read_text()
    template = (REPO / "templates" / "ollama" / "alpaca.tmpl").read_text()
    assert modelfile == (f"# Ollama Modelfile for demo-q4_k_m.gguf, written by alpaca-lora's export_hf.py\n"
                         f'FROM ./demo-q4_k_m.gguf\nTEMPLATE """{template}"""\nPARAMETER stop "</s>"\n')
    assert lines[-2] == f"wrote {tmp_path / 'demo-q4_k_m.Modelfile'}: `ollama create NAME -f " \
                        f"{tmp_path / 'demo-q4_k_m.Modelfile'}`"
    assert lines[-1] == f"wrote {tmp_path / 'demo-q4_k_m.md'}: the GGUF file's model card"
    card = (tmp_path / "demo-q4_k_m.md").read_text()
    assert "`ollama create NAME -f demo-q4_k_m.Modelfile`" in card and "CC BY-NC 4.0" in card


def test_llama_cpps_chat_prompts_an_alpaca_adapters_file_with_alpacas_prompt(tiny_adapter, llama_cpp_chat_prompt,
                                                                           tmp_path):
    """An adapter trained on Alpaca's prompt gets templates/alpaca.jinja in its GGUF: llama.cpp's chat (llama-server,
    llama-cli -cnv) then prompts an instruction with the ids training had."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llama-cpp]'")
    from transformers import AutoTokenizer

    from alpaca_lora.templates import load_template

    export(ExportConfig(lora_weights=str(tiny_adapter), gguf=str(tmp_path / "m.gguf"), gguf_type="f16"), write=quiet)
    tokenizer = AutoTokenizer.from_pretrained(tiny_adapter)
    instruction = "Give three tips for staying healthy."
    ids, _ = llama_cpp_chat_prompt(tmp_path / "m.gguf", [{"role": "user", "content": instruction}])
    trained = load_template("alpaca").prompt_no_input.format(instruction=instruction)
    assert ids == [tokenizer.bos_token_id] + tokenizer(trained, add_special_tokens=False)["input_ids"]


def test_a_chat_template_llama_cpp_renders_otherwise_stops_the_export(tiny_chat_adapter, tmp_path, monkeypatch):
    """llama-cpp-python's chat formatter on the template read back from the file must give training's prompt for each
    held-out conversation; here training's prompt is made to differ, and nothing is left behind."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llama-cpp]'")
    import alpaca_lora.chat_template as chat_template

    lines = []
    report = export(ExportConfig(lora_weights=str(tiny_chat_adapter), gguf=str(tmp_path / "m.gguf"), gguf_type="f16"),
                    write=lines.append)["gguf"]["llama_cpp"]
    assert report["chat_prompts_checked"] >= 1
    assert f"its chat template gives training's prompt for {report['chat_prompts_checked']} conversations" in lines[-3]
    real_prompt_text = chat_template.prompt_text
    monkeypatch.setattr(chat_template, "prompt_text", lambda *args: real_prompt_text(*args) + " ")
    with pytest.raises(ValueError, match=r"^--gguf: llama\.cpp's chat template renders the conversation as .*, "
                                         r"training as .*; nothing was written$"):
        export(ExportConfig(lora_weights=str(tiny_chat_adapter), gguf=str(tmp_path / "other.gguf"), gguf_type="f16"),
               write=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf", "m.md"]


def test_llama_cpps_types_without_llama_cpp_python_are_one_line(tiny_adapter, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    with pytest.raises(ValueError, match=r'^--gguf_type q5_k_m needs llama-cpp-python, which is not installed: pip '
                                         r'install -e "\.\[llama-cpp\]"'):
        export(ExportConfig(lora_weights=str(tiny_adapter), gguf=str(tmp_path / "m.gguf"), gguf_type="q5_k_m"),
               write=quiet)
    assert list(tmp_path.iterdir()) == []
