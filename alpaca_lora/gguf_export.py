"""GGUF: the merged weights and the vocabulary in the file format llama.cpp reads, for every family trained here.

Tensor names come from the gguf package's TensorNameMap for the model's llama.cpp architecture; the weights are
re-laid where llama.cpp's own converter (convert_hf_to_gguf.py) re-lays them: LLaMA-architecture q and k in Meta's
interleaved rotary layout (llama_layout.py), Gemma's norms stored as 1 + weight (its RMSNorm multiplies by 1 + w).
A tied output (Gemma, small Qwen and Llama 3.2) is left out, as llama.cpp then reuses the token embeddings. The
vocabulary is SentencePiece's (tokens, scores, types) or byte-level BPE's (tokens, merges, types and the name of the
pre-tokenizer llama.cpp must use), with the chat template trained with and its end-of-turn token. The file is read
back with gguf's reader and every tensor compared with the merged weights before it is renamed into place.
"""

from pathlib import Path

import numpy as np

from .files import staged
from .gguf_vocabulary import add_vocabulary
from .llama_layout import hf_to_meta_rotary

PROBE_TEXT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype values: "all F32", "mostly F16", ...
# Hugging Face model_type -> llama.cpp architecture (Mistral is the LLaMA architecture to llama.cpp)
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "phi3": "PHI3",
                 "gemma2": "GEMMA2", "gemma3_text": "GEMMA3"}


def architecture(model_config):
    import gguf

    name = ARCHITECTURES.get(model_config.model_type)
    if name is None:
        raise ValueError(f"--gguf: no GGUF export for model_type {model_config.model_type!r}; the families exported are "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return gguf.MODEL_ARCH[name]


def gguf_tensors(model_config, state: dict) -> dict[str, np.ndarray]:
    """Merged HF weights (fp32) under llama.cpp's names, re-laid as llama.cpp's converter does."""
    import gguf

    arch = architecture(model_config)
    names = gguf.get_tensor_name_map(arch, model_config.num_hidden_layers)
    heads, kv_heads = model_config.num_attention_heads, getattr(model_config, "num_key_value_heads", None)
    out = {}
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and getattr(model_config, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd
        tensor = tensor.float()
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = hf_to_meta_rotary(tensor, heads if "q_proj" in hf_name else (kv_heads or heads))
        if arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3) and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"--gguf: llama.cpp has no name for the tensor {hf_name}; nothing was written")
        out[name] = tensor.numpy()
    return out


def _encode(name: str, array: np.ndarray, gguf_type: str):
    """(data, raw dtype) for one tensor: norms stay f32, as llama.cpp's converter keeps them."""
    import gguf

    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), None
    if gguf_type == "f16":
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if gguf_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
        return array.astype(np.float16), None  # q8_0 needs rows in blocks of 32; llama.cpp falls back the same way
    return gguf.quants.quantize(array, kind), kind


def _add_hyperparameters(writer, arch, config) -> None:
    """What llama.cpp reads of the architecture, as its converter writes it for each family."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0))
    if arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.PHI3):
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads or arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3) and config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3, gguf.MODEL_ARCH.PHI3) and config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
    if arch == gguf.MODEL_ARCH.GEMMA3 and config.sliding_window:  # which layers slide, and their own rope base
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
        sliding = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention") or {}
        writer.add_rope_freq_base_swa(float(sliding.get("rope_theta") or config.rope_local_base_freq))


def export_gguf(merged, state: dict, adapter_folder: Path, base_folder: Path, tokenizer, chat_template: str | None,
                prompt_template: str | None, probe, reference_logits, config, write) -> dict:
    """The GGUF export as export.py asks for it: the vocabulary from the adapter's tokenizer files (or the base's),
    the stop tokens from the adapter's generation_config.json, and llama.cpp's checks where llama-cpp-python is."""
    from transformers import GenerationConfig

    from .chat_template import bos_ids, load_chat_template

    folders = [adapter_folder, base_folder]
    tokenizer_folder = next((f for f in folders if (f / "tokenizer.json").is_file()), adapter_folder)
    sentencepiece_model = next((f / "tokenizer.model" for f in folders if (f / "tokenizer.model").is_file()), None)
    stops = (GenerationConfig.from_pretrained(adapter_folder).eos_token_id
             if (adapter_folder / "generation_config.json").is_file() else tokenizer.eos_token_id)
    stops = stops if isinstance(stops, list) else [stops]
    check = _llama_cpp_check(tokenizer, chat_template, adapter_folder, probe, reference_logits, config.gguf_type)
    # an adapter trained on Alpaca's prompt gets templates/alpaca.jinja in the file, which renders one user message as
    # that prompt without input, so that llama.cpp's chat (llama-server, llama-cli -cnv) prompts as training did
    file_template = chat_template or (load_chat_template("alpaca", tokenizer).source if prompt_template == "alpaca"
                                      else None)
    report = write_gguf(merged.config, state, tokenizer_folder, sentencepiece_model, tokenizer, file_template, stops,
                        bool(bos_ids(tokenizer)), config, write, check)
    report["modelfile"] = str(write_modelfile(Path(config.gguf).expanduser(), chat_template, prompt_template,
                                              tokenizer.convert_ids_to_tokens(stops)))
    write(f"wrote {report['modelfile']}: `ollama create NAME -f {report['modelfile']}`")
    return report


def write_modelfile(gguf_path: Path, chat_template: str | None, prompt_template: str | None,
                    stop_tokens: list[str]) -> Path:
    """An Ollama Modelfile beside the GGUF: FROM it, the prompt as a Go template where the chat template trained
    with is a shipped one (templates/ollama/, hand-translated; also the `alpaca` prompt template's, without input),
    and a stop for each token that ends an answer."""
    from .chat_template import TEMPLATES_DIR, available_chat_templates
    from .files import write_text_atomically

    shipped = {(TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8"): name for name in available_chat_templates()}
    name = shipped.get(chat_template) if chat_template else prompt_template
    go_template = TEMPLATES_DIR / "ollama" / f"{name}.tmpl" if name else None
    lines = [f"# Ollama Modelfile for {gguf_path.name}, written by alpaca-lora's export_hf.py", f"FROM ./{gguf_path.name}"]
    if go_template and go_template.is_file():
        lines.append(f'TEMPLATE """{go_template.read_text(encoding="utf-8")}"""')
    else:
        lines.append("# no TEMPLATE: the template trained with has no Go translation here; Ollama takes the GGUF's "
                     "tokenizer.chat_template where it recognises one")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    path = gguf_path.with_suffix(".Modelfile")
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


def _llama_cpp_check(tokenizer, chat_template: str | None, adapter_folder: Path, probe, reference_logits,
                     gguf_type: str):
    """The check write_gguf runs on the staged file, or None without llama-cpp-python (f32 ... q8_0 only)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from .chat_template import ChatTemplate, prompt_text, render
    from .conversations import conversation_of
    from .llama_cpp_checks import check_gguf

    texts, prompts = [PROBE_TEXT], []
    if chat_template:  # conversations as a deployment renders them: the held-out rows, or a sample
        chat = ChatTemplate("trained", chat_template)
        rows = _held_out_rows(adapter_folder) or [{"instruction": "Name three colours.", "output": "Red, green, blue."}]
        conversations = [conversation_of(row) for row in rows[:8]]
        texts = [render(chat, tokenizer, messages) for messages in conversations]
        prompts = [(messages[:-1], prompt_text(chat, tokenizer, messages[:-1])) for messages in conversations]
    held_out = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]][:128]

    def check(path: Path, f16_path: Path | None) -> dict:
        return check_gguf(path, f16_path, gguf_type, tokenizer, texts, prompts, probe[0].tolist(),
                          reference_logits.numpy(), held_out)
    return check


def _held_out_rows(adapter_folder: Path) -> list[dict]:
    import json

    path = adapter_folder / "validation_rows.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def write_gguf(model_config, state: dict, tokenizer_folder: Path, sentencepiece_model: Path | None, tokenizer,
               chat_template: str | None, stop_token_ids: list[int], bos: bool, config, write, check=None) -> dict:
    """The GGUF file of the merged model, its vocabulary, chat template and stop token; read back and checked, then
    (`check`, given the staged file and the f16 file a llama.cpp type is quantized from) checked by llama.cpp."""
    from .llama_cpp_checks import QUANTIZED_TYPES, quantize

    tensors = gguf_tensors(model_config, state)
    target = Path(config.gguf).expanduser()
    by_llama_cpp = config.gguf_type in QUANTIZED_TYPES  # written f16 first, then quantized by llama.cpp
    with staged(target) as staging:
        first = staging.with_name(staging.name + ".f16") if by_llama_cpp else staging
        try:
            _write_file(first, model_config, tensors, tokenizer_folder, sentencepiece_model, tokenizer, chat_template,
                        stop_token_ids, bos, config, "f16" if by_llama_cpp else config.gguf_type)
            worst = verify_gguf(first, tensors, "f16" if by_llama_cpp else config.gguf_type)
            if by_llama_cpp:
                quantize(first, staging, config.gguf_type)
            report = {"tensors": len(tensors), "max_abs_error": worst}
            if check:
                report["llama_cpp"] = check(staging, first if by_llama_cpp else None)
        finally:
            if by_llama_cpp and first.exists():
                first.unlink()
    checked = report.get("llama_cpp")
    write(f"wrote {target}: {len(tensors)} tensors ({config.gguf_type}), largest error read back {worst:.3g}"
          + (f"; llama.cpp: {described_checks(checked)}" if checked else
             "; not checked by llama.cpp (llama-cpp-python is not installed)"))
    return report


def described_checks(checked: dict) -> str:
    parts = [f"tokenizes {checked['tokens_checked']} texts as the tokenizer"]
    if checked["chat_prompts_checked"]:
        parts.append(f"its chat template gives training's prompt for {checked['chat_prompts_checked']} conversations")
    if "max_logit_error" in checked:
        parts.append(f"probe logits within {checked['max_logit_error']:.3g} of base + adapter")
    if "log_prob_drop" in checked:
        parts.append(f"mean log-probability per held-out token {checked['mean_log_prob']:.4f} against the f16 file's "
                     f"{checked['f16_mean_log_prob']:.4f} (a drop of {checked['log_prob_drop']:.4f}, allowed "
                     f"{checked['log_prob_bound']})")
    return "; ".join(parts)


def _write_file(path: Path, model_config, tensors: dict, tokenizer_folder: Path, sentencepiece_model: Path | None,
                tokenizer, chat_template: str | None, stop_token_ids: list[int], bos: bool, config,
                gguf_type: str) -> None:
    import gguf

    arch = architecture(model_config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(Path(config.lora_weights).name)
    _add_hyperparameters(writer, arch, model_config)
    writer.add_vocab_size(model_config.vocab_size)
    writer.add_file_type(FILE_TYPES[gguf_type])
    add_vocabulary(writer, tokenizer_folder, sentencepiece_model, tokenizer, model_config.vocab_size, chat_template)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)  # the pad token training used
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(False)
    if chat_template:  # the template trained with, and the token that ends its turns
        writer.add_chat_template(chat_template)
        writer.add_eot_token_id(stop_token_ids[0])
    for name, array in tensors.items():
        data, raw_dtype = _encode(name, array, gguf_type)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to fp32, in the [rows, columns] order the writer was given."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        out[tensor.name] = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
    return out


def allowed_error(array: np.ndarray, gguf_type: str) -> float:
    """f32 exact; f16 and bf16 round each weight by at most half a unit in the last place; q8_0 keeps 8 bits
    per block of 32 (scale = block max / 127): at most half a step of the largest block."""
    largest = float(np.abs(array).max()) if array.size else 0.0
    if gguf_type == "f32" or array.ndim == 1:
        return 0.0
    return largest * {"f16": 2 ** -11, "bf16": 2 ** -8, "q8_0": 1 / 127}[gguf_type] + 1e-7


def verify_gguf(path: Path, expected: dict[str, np.ndarray], gguf_type: str) -> float:
    got = read_gguf_tensors(path)
    if set(got) != set(expected):
        raise ValueError(f"--gguf: the file read back holds other tensors ({sorted(set(got) ^ set(expected))[:3]}); "
                         "nothing was written")
    worst = 0.0
    for name, array in expected.items():
        if got[name].shape != array.shape:
            raise ValueError(f"--gguf: {name} reads back as {got[name].shape}, not {array.shape}; nothing was written")
        error = float(np.abs(got[name] - array).max())
        kind = gguf_type if not (gguf_type == "q8_0" and array.shape[-1] % 32) else "f16"
        if error > allowed_error(array, kind):
            raise ValueError(f"--gguf: {name} reads back {error:.3g} from the merged weights; nothing was written")
        worst = max(worst, error)
    return worst
