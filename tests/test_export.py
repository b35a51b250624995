import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_lora.export import ExportConfig, PROBE, export
from alpaca_lora.gguf_export import gguf_tensors, read_gguf_tensors
from alpaca_lora.generate import Generator, Sampling
from alpaca_lora.llama_layout import meta_to_hf_rotary


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def merged_reference(tiny_base, tiny_adapter):
    """base + adapter through peft, and the merged fp32 weights, computed independently of export.py."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), tiny_adapter)
    ids = AutoTokenizer.from_pretrained(tiny_base)(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    merged = model.merge_and_unload()
    return {"logits": logits, "ids": ids, "state": {k: v.clone() for k, v in merged.state_dict().items()},
            "config": merged.config}


def test_merged_hf_checkpoint_reloads_as_base_plus_adapter(tiny_adapter, merged_reference, tmp_path):
    out = tmp_path / "hf"
    adapter = tmp_path / "adapter"  # without its model card: the export's card comes from training_summary.json
    shutil.copytree(tiny_adapter, adapter, ignore=shutil.ignore_patterns("README.md"))
    report = export(ExportConfig(lora_weights=str(adapter), output_dir=str(out), dtype="float32"), write=quiet)
    assert report["hf"]["max_abs_difference"] <= 1e-4 < report["hf"]["difference_from_base"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    card = (out / "README.md").read_text()
    assert "| `lora_r` | `8` |" in card and '"train_rows": 48' in card and "`alpaca` template" in card
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = reloaded(input_ids=merged_reference["ids"]).logits[0]
    assert (logits - merged_reference["logits"]).abs().max() <= 1e-4
    # generate.py --base_model ./hf answers as base + adapter does
    greedy = Sampling(temperature=0.0, max_new_tokens=10)
    merged, adapted = (Generator(base_model=str(out), bf16=False, device="cpu"),
                       Generator(lora_weights=str(tiny_adapter), bf16=False, device="cpu"))
    merged_answer = merged.answer([merged.text_ids("Hello")], greedy)
    adapter_answer = adapted.answer([adapted.text_ids("Hello")], greedy)
    assert merged_answer == adapter_answer


def test_16_bit_export_states_its_tolerance(tiny_adapter, tmp_path):
    lines = []
    report = export(ExportConfig(lora_weights=str(tiny_adapter), output_dir=str(tmp_path / "bf16"), dtype="bfloat16"),
                    write=lines.append)
    assert 1e-4 < report["hf"]["allowed"] and report["hf"]["max_abs_difference"] <= report["hf"]["allowed"]
    assert any("allowed" in line for line in lines)


def test_an_adapter_that_changes_nothing_is_refused(tiny_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    empty = tmp_path / "empty-adapter"
    empty.mkdir()
    for name in ("adapter_config.json", "training_summary.json"):
        (empty / name).write_text((tiny_adapter / name).read_text())
    weights = load_file(tiny_adapter / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              empty / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="equals the bare base .* merged nothing; nothing was written"):
        export(ExportConfig(lora_weights=str(empty), output_dir=str(tmp_path / "out"), dtype="float32"), write=quiet)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_adapter, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--output_dir .*out: exists and is not empty; pass --overwrite"):
        export(ExportConfig(lora_weights=str(tiny_adapter), output_dir=str(tmp_path / "out")), write=quiet)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="nothing to write"):
        export(ExportConfig(lora_weights=str(tiny_adapter)), write=quiet)
    with pytest.raises(ValueError, match=r"--gguf_type 'q4'"):
        export(ExportConfig(lora_weights=str(tiny_adapter), gguf=str(tmp_path / "m.gguf"), gguf_type="q4"), write=quiet)


@pytest.mark.parametrize("gguf_type, tolerance", [("f32", 0.0), ("f16", 2 ** -11), ("bf16", 2 ** -8), ("q8_0", 1 / 127)])
def test_gguf_reads_back_with_every_tensor_metadata_and_vocabulary(tiny_base, tiny_adapter, merged_reference, tmp_path,
                                                                    gguf_type, tolerance):
    import gguf
    import sentencepiece as spm

    path = tmp_path / "model.gguf"
    export(ExportConfig(lora_weights=str(tiny_adapter), gguf=str(path), gguf_type=gguf_type), write=quiet)
    config, state = merged_reference["config"], merged_reference["state"]
    tensors = read_gguf_tensors(path)
    assert len(tensors) == 3 + 9 * config.num_hidden_layers
    # q is stored in the interleaved rotary layout: undoing it gives the merged HF weight back
    q = meta_to_hf_rotary(torch.from_numpy(tensors["blk.1.attn_q.weight"]), config.num_attention_heads)
    expected_q = state["model.layers.1.self_attn.q_proj.weight"]
    assert (q - expected_q).abs().max() <= tolerance * expected_q.abs().max() + 1e-7
    for name, array in gguf_tensors(config, state).items():
        assert tensors[name].shape == array.shape, name
        bound = 0.0 if (gguf_type == "f32" or array.ndim == 1) else tolerance * np.abs(array).max() + 1e-7
        assert np.abs(tensors[name] - array).max() <= bound, name
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == gguf_type.upper()

    def field(key):
        value = reader.fields[key]
        return value.contents() if hasattr(value, "contents") else value.parts[value.data[0]]
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == config.num_hidden_layers
    assert field("llama.attention.head_count") == config.num_attention_heads
    assert field("llama.rope.dimension_count") == config.hidden_size // config.num_attention_heads
    processor = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == processor.vocab_size() == config.vocab_size
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[100] == processor.id_to_piece(100)
    assert field("tokenizer.ggml.scores")[100] == pytest.approx(processor.get_score(100))
    token_types = field("tokenizer.ggml.token_type")
    assert token_types[:3] == [2, 3, 3] and token_types[3] == 6  # unknown, control, control, byte <0x00>
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)


def test_llama_cpp_gives_the_merged_models_greedy_tokens(tiny_adapter, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llama-cpp]'"
                                                        " (builds llama.cpp, about 4 minutes)")
    export(ExportConfig(lora_weights=str(tiny_adapter), gguf=str(tmp_path / "m.gguf"), gguf_type="f32",
                        output_dir=str(tmp_path / "hf"), dtype="float32"), write=quiet)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt_ids = [tokenizer.bos_token_id] + tokenizer("Name three colours.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                  pad_token_id=0)[0, len(prompt_ids):].tolist()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, verbose=False, seed=0)
    assert llm.tokenize(b"Name three colours.", add_bos=True) == prompt_ids  # the same vocabulary
    got = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == 12:
            break
    assert got == expected


def test_meta_checkpoint_is_the_merged_weights_relaid(tiny_base, tiny_adapter, merged_reference, tmp_path):
    out = tmp_path / "meta"
    export(ExportConfig(lora_weights=str(tiny_adapter), meta_checkpoint=str(out), dtype="float32"), write=quiet)
    config, state = merged_reference["config"], merged_reference["state"]
    saved = torch.load(out / "consolidated.00.pth", weights_only=True)
    params = json.loads((out / "params.json").read_text())
    assert params["dim"] == config.hidden_size and params["n_layers"] == config.num_hidden_layers
    assert params["n_heads"] == config.num_attention_heads and params["vocab_size"] == config.vocab_size
    assert (out / "tokenizer.model").read_bytes() == (tiny_base / "tokenizer.model").read_bytes()
    for layer in range(config.num_hidden_layers):
        for meta, hf, heads in (("attention.wq", "self_attn.q_proj", config.num_attention_heads),
                                ("attention.wk", "self_attn.k_proj", config.num_key_value_heads)):
            assert torch.equal(meta_to_hf_rotary(saved[f"layers.{layer}.{meta}.weight"], heads),
                               state[f"model.layers.{layer}.{hf}.weight"])
        assert torch.equal(saved[f"layers.{layer}.feed_forward.w1.weight"], state[f"model.layers.{layer}.mlp.gate_proj.weight"])
        assert torch.equal(saved[f"layers.{layer}.attention.wv.weight"], state[f"model.layers.{layer}.self_attn.v_proj.weight"])
    assert torch.equal(saved["output.weight"], state["lm_head.weight"])
    assert len(saved) == 3 + 9 * config.num_hidden_layers


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_adapter_merges_either_way_and_reports_the_trade_off(tiny_base, alpaca_file, tmp_path, quantization):
    from alpaca_lora.config import TrainConfig
    from alpaca_lora.train import train

    adapter = tmp_path / "adapter"
    train(TrainConfig(base_model=str(tiny_base), data_path=str(alpaca_file), output_dir=str(adapter), batch_size=8,
                      micro_batch_size=4, max_steps=2, val_set_size=0, cutoff_len=512, learning_rate=5e-2, bf16=False,
                      warmup_steps=0, tokenized_cache_dir="", load_4bit=quantization == "4bit",
                      load_8bit=quantization == "8bit"))
    lines = []
    full = export(ExportConfig(lora_weights=str(adapter), output_dir=str(tmp_path / "full"), dtype="float32"),
                  write=lines.append)
    assert any(f"trained on a {quantization} base" in line for line in lines)
    distances = full["quantized"]
    # merging into the weights the adapter was trained against reproduces the quantized model more closely
    assert distances["dequantized_base"] < distances["full_precision_base"]
    dequantized = export(ExportConfig(lora_weights=str(adapter), output_dir=str(tmp_path / "deq"), dtype="float32",
                                      dequantize=True), write=quiet)
    assert dequantized["hf"]["max_abs_difference"] <= 1e-4
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").model.layers[0].mlp.up_proj.weight
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "deq").model.layers[0].mlp.up_proj.weight
    assert not torch.equal(a, b)  # the dequantized base really is another set of weights


def test_bad_input_is_one_line_and_writes_nothing(tiny_adapter, tmp_path):
    from conftest import REPO, run_script

    from alpaca_lora.demo import DemoConfig, build_demo_model

    other = build_demo_model(DemoConfig(output_dir=str(tmp_path / "other"), vocab_size=512, hidden_size=96,
                                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        pretrain_steps=0))
    with pytest.raises(ValueError, match=r"--lora_weights .* does not fit --base_model"):
        export(ExportConfig(lora_weights=str(tiny_adapter), base_model=str(other), output_dir=str(tmp_path / "x")),
               write=quiet)
    assert not (tmp_path / "x").exists()
    result = run_script(REPO / "export_hf.py", "--lora_weights", tmp_path / "missing", "--output_dir", tmp_path / "y")
    assert result.returncode == 1 and not (tmp_path / "y").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("export_hf.py: error: --lora_weights")


def _scaled_adapter(tiny_adapter, folder, scale):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_adapter, folder)
    weights = load_file(tiny_adapter / "adapter_model.safetensors")
    save_file({k: v * scale if "lora_B" in k else v for k, v in weights.items()}, folder / "adapter_model.safetensors")
    return folder


def test_a_change_below_16_bit_rounding_is_named_as_such(tiny_adapter, tmp_path):
    faint = _scaled_adapter(tiny_adapter, tmp_path / "faint", 0.001)  # a briefly trained adapter
    with pytest.raises(ValueError, match=r"the adapter changes the probe logits by at most .*, less than the rounding "
                                         r"of 16-bit weights allows .*use --dtype float32"):
        export(ExportConfig(lora_weights=str(faint), output_dir=str(tmp_path / "f16")), write=quiet)
    assert not (tmp_path / "f16").exists()
    report = export(ExportConfig(lora_weights=str(faint), output_dir=str(tmp_path / "f32"), dtype="float32"),
                    write=quiet)
    assert report["hf"]["max_abs_difference"] <= 1e-4 < report["hf"]["difference_from_base"]


def test_merging_onto_another_base_of_the_same_shape_is_said_and_recorded(tiny_base, tiny_adapter, tmp_path):
    from alpaca_lora.demo import DemoConfig, build_demo_model

    other = build_demo_model(DemoConfig(output_dir=str(tmp_path / "other"), vocab_size=512, hidden_size=64,
                                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        pretrain_steps=0, seed=7))  # the same shape, other weights
    lines = []
    export(ExportConfig(lora_weights=str(tiny_adapter), base_model=str(other), output_dir=str(tmp_path / "out"),
                        dtype="float32"), write=lines.append)
    assert any(line.startswith(f"warning: merging onto {other}, but the adapter was trained on {tiny_base}")
               for line in lines)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"**The adapter was trained on `{tiny_base}`, not on `{other}`**" in card
    same = []
    export(ExportConfig(lora_weights=str(tiny_adapter), base_model=str(tiny_base), output_dir=str(tmp_path / "same"),
                        dtype="float32"), write=same.append)
    assert not any(line.startswith("warning") for line in same)


@pytest.mark.parametrize("flag", ["gguf", "output_dir", "meta_checkpoint"])
def test_a_path_flag_given_without_a_path_is_one_line(tiny_adapter, flag):
    with pytest.raises(ValueError, match=rf"--{flag} needs a value, e.g. --{flag} ./"):
        export(ExportConfig(lora_weights=str(tiny_adapter), **{flag: True}), write=quiet)


def test_a_damaged_adapter_is_named_by_export_and_generate(tiny_adapter, tmp_path):
    from conftest import REPO, run_script

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_adapter, damaged)
    weights = (damaged / "adapter_model.safetensors").read_bytes()
    (damaged / "adapter_model.safetensors").write_bytes(weights[:len(weights) // 2])
    message = f"--lora_weights {damaged}: adapter_model.safetensors is damaged or cut short"
    with pytest.raises(ValueError, match=message):
        export(ExportConfig(lora_weights=str(damaged), output_dir=str(tmp_path / "out")), write=quiet)
    with pytest.raises(ValueError, match=message):
        Generator(lora_weights=str(damaged), bf16=False, device="cpu")
    result = run_script(REPO / "generate.py", "--lora_weights", damaged, "--instruction", "hi")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"generate.py: error: {message}")


def test_a_full_disk_leaves_no_half_export(tiny_adapter, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def disk_full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device", str(folder))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        export(ExportConfig(lora_weights=str(tiny_adapter), output_dir=str(tmp_path / "out")), write=quiet)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder
