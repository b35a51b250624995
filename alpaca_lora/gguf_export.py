"""GGUF: the merged weights and the vocabulary in the file format llama.cpp reads, for every family trained here.

Tensor names come from the gguf package's TensorNameMap for the model's llama.cpp architecture; the weights are
re-laid where llama.cpp's own converter (convert_hf_to_gguf.py) re-lays them: LLaMA-architecture q and k in Meta's
interleaved rotary layout (llama_layout.py), Gemma's norms stored as 1 + weight (its RMSNorm multiplies by 1 + w).
A tied output (Gemma, small Qwen and Llama 3.2) is left out, as llama.cpp then reuses the token embeddings. The
vocabulary is SentencePiece's (tokens, scores, types) or byte-level BPE's (tokens, merges, types and the name of the
pre-tokenizer llama.cpp must use), with the chat template trained with and its end-of-turn token. The file is read
back with gguf's reader and every tensor compared with the merged weights before it is renamed into place.
"""

import json
from pathlib import Path

import numpy as np

from .files import staged
from .llama_layout import hf_to_meta_rotary

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype values: "all F32", "mostly F16", ...
# Hugging Face model_type -> llama.cpp architecture (Mistral is the LLaMA architecture to llama.cpp)
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "phi3": "PHI3",
                 "gemma2": "GEMMA2", "gemma3_text": "GEMMA3"}
# the byte-level pre-tokenizers llama.cpp knows, by their split regex in tokenizer.json
BPE_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


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


def _sentencepiece_vocabulary(tokenizer_model: Path):
    """Pieces, scores and token types from the SentencePiece model, as llama.cpp's LLaMA converter reads them."""
    import gguf
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens, scores, types = [], [], []
    for i in range(processor.vocab_size()):
        tokens.append(processor.id_to_piece(i).encode("utf-8"))
        scores.append(processor.get_score(i))
        kind = gguf.TokenType.NORMAL
        if processor.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif processor.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif processor.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif processor.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(kind)
    return tokens, scores, types


def _add_vocabulary(writer, folder: Path, sentencepiece_model: Path | None, tokenizer, vocab_size: int,
                    chat_template: str | None) -> None:
    """The tokenizer as llama.cpp reads it: SentencePiece ("llama": from the SentencePiece model where there is one
    for this vocabulary, else from tokenizer.json) or byte-level BPE ("gpt2"), padded to the embedding rows with
    unused tokens, as llama.cpp's converter pads it."""
    import gguf

    definition = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    byte_level = "ByteLevel" in json.dumps(definition.get("pre_tokenizer") or {})
    if byte_level:
        vocab = gguf.BpeVocab(folder)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(definition))
    elif sentencepiece_model and _piece_count(sentencepiece_model) <= len(tokenizer):
        vocab = None
        tokens, scores, types = _sentencepiece_vocabulary(sentencepiece_model)
        for token_id in range(len(tokens), len(tokenizer)):  # tokens added to the tokenizer after its model
            tokens.append(tokenizer.convert_ids_to_tokens(token_id).encode("utf-8"))
            scores.append(-1000.0)
            types.append(gguf.TokenType.USER_DEFINED)
        writer.add_tokenizer_model("llama")
    else:  # SentencePiece-style BPE known only from tokenizer.json: llama.cpp merges the highest score first, so
        # each merged piece scores minus its merge's rank, which replays the merges in their order
        vocab = gguf.LlamaHfVocab(folder)
        writer.add_tokenizer_model("llama")
    if vocab is not None:
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
    if vocab is not None and not byte_level:
        rank = {"".join(pair.split(" ") if isinstance(pair, str) else pair): i
                for i, pair in enumerate(definition["model"].get("merges") or [])}
        scores = [-float(rank[text.decode("utf-8", "replace")]) if text.decode("utf-8", "replace") in rank else score
                  for text, score in zip(tokens, scores)]
    # the tokenizer's added tokens, typed as llama.cpp's converter types them: special ones are control tokens
    # (parsed out of text, never produced by splitting it), the others user-defined (also matched whole)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < len(types) and types[token_id] not in (gguf.TokenType.BYTE, gguf.TokenType.UNKNOWN):
            types[token_id] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    if len(tokens) > vocab_size:
        raise ValueError(f"--gguf: the tokenizer has {len(tokens)} tokens but the model {vocab_size} embeddings; "
                         "GGUF needs one embedding per token")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if byte_level:
        writer.add_token_merges([" ".join(pair) if isinstance(pair, list) else pair
                                 for pair in definition["model"]["merges"]])
    else:
        writer.add_add_space_prefix(_space_prefix(definition, tokenizer, chat_template))


def _space_prefix(definition: dict, tokenizer, chat_template: str | None) -> bool:
    """llama.cpp's add_space_prefix for a SentencePiece vocabulary: whether a space goes before text that starts the
    input or follows a special token, as the tokenizer puts one. Gemma's puts none. LLaMA's and Mistral's (Metaspace,
    "first") put one before the very start only, which llama.cpp cannot do; their chat templates start with BOS as
    text, so in a chat no space ever comes, and that is what the file says when it carries such a template."""
    steps = json.dumps([definition.get("normalizer"), definition.get("pre_tokenizer")])
    if '"Prepend"' in steps or '"prepend_scheme": "always"' in steps:
        return True
    if '"prepend_scheme": "first"' not in steps:
        return False
    from .chat_template import ChatTemplate, render

    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    return not (chat_template and tokenizer.bos_token and
                render(ChatTemplate("trained", chat_template), tokenizer, probe).startswith(tokenizer.bos_token))


def _piece_count(tokenizer_model: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_model)).vocab_size()


def _pre_tokenizer_name(definition: dict) -> str:
    patterns = [step.get("pattern", {}).get("Regex") for step in (definition["pre_tokenizer"].get("pretokenizers") or
                                                                   [definition["pre_tokenizer"]])]
    for pattern in patterns:
        if pattern in BPE_PRE_TOKENIZERS:
            return BPE_PRE_TOKENIZERS[pattern]
    raise ValueError("--gguf: this byte-level tokenizer splits text in a way llama.cpp knows by no name of the ones "
                     f"exported here ({', '.join(sorted(set(BPE_PRE_TOKENIZERS.values())))}); nothing was written")


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


def write_gguf(model_config, state: dict, tokenizer_folder: Path, sentencepiece_model: Path | None, tokenizer,
               chat_template: str | None, stop_token_ids: list[int], bos: bool, config, write) -> dict:
    """The GGUF file of the merged model, its vocabulary, chat template and stop token; read back and checked."""
    import gguf

    arch = architecture(model_config)
    tensors = gguf_tensors(model_config, state)
    target = Path(config.gguf).expanduser()
    with staged(target) as staging:
        writer = gguf.GGUFWriter(str(staging), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(Path(config.lora_weights).name)
        _add_hyperparameters(writer, arch, model_config)
        writer.add_vocab_size(model_config.vocab_size)
        writer.add_file_type(FILE_TYPES[config.gguf_type])
        _add_vocabulary(writer, tokenizer_folder, sentencepiece_model, tokenizer, model_config.vocab_size, chat_template)
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
            data, raw_dtype = _encode(name, array, config.gguf_type)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        worst = verify_gguf(staging, tensors, config.gguf_type)
    write(f"wrote {target}: {len(tensors)} tensors ({config.gguf_type}), largest error read back {worst:.3g}")
    return {"tensors": len(tensors), "max_abs_error": worst}


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
