"""GGUF: the merged LLaMA weights and the SentencePiece vocabulary in the file format llama.cpp reads.

Tensor names, the q/k rotary re-layout and the metadata follow llama.cpp's own converter for LLaMA
(convert_hf_to_gguf.py): GGUF stores q and k in Meta's interleaved rotary layout, not Hugging Face's.
The file is read back with gguf's reader and every tensor compared with the merged weights before it
is renamed into place.
"""

from pathlib import Path

import numpy as np

from .files import staged
from .llama_layout import gguf_state_dict

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype values: "all F32", "mostly F16", ...


def gguf_tensors(model_config, state: dict) -> dict[str, np.ndarray]:
    """Merged HF weights (fp32) under llama.cpp's names, q and k in the interleaved rotary layout."""
    return {name: t.float().numpy() for name, t in gguf_state_dict(model_config, state).items()}


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


def _vocabulary(tokenizer_model: Path):
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
    return processor, tokens, scores, types


def write_gguf(model_config, state: dict, base_model: str, config, write) -> dict:
    import gguf

    tokenizer_model = Path(base_model) / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise ValueError(f"--gguf: the base model folder {base_model} has no tokenizer.model (SentencePiece); "
                         "GGUF export needs LLaMA's SentencePiece vocabulary")
    processor, tokens, scores, types = _vocabulary(tokenizer_model)
    if len(tokens) != model_config.vocab_size:
        raise ValueError(f"--gguf: tokenizer.model has {len(tokens)} pieces but the model {model_config.vocab_size} "
                         "embeddings; GGUF needs them equal")
    target = Path(config.gguf).expanduser()
    with staged(target) as staging:
        writer = gguf.GGUFWriter(str(staging), "llama")
        writer.add_name(Path(config.lora_weights).name)
        writer.add_context_length(model_config.max_position_embeddings)
        writer.add_embedding_length(model_config.hidden_size)
        writer.add_block_count(model_config.num_hidden_layers)
        writer.add_feed_forward_length(model_config.intermediate_size)
        writer.add_head_count(model_config.num_attention_heads)
        writer.add_head_count_kv(getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads)
        writer.add_rope_dimension_count(model_config.hidden_size // model_config.num_attention_heads)
        writer.add_rope_freq_base(float(getattr(model_config, "rope_theta", None) or 10000.0))
        writer.add_layer_norm_rms_eps(model_config.rms_norm_eps)
        writer.add_vocab_size(model_config.vocab_size)
        writer.add_file_type(FILE_TYPES[config.gguf_type])
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(processor.bos_id())
        writer.add_eos_token_id(processor.eos_id())
        writer.add_unk_token_id(processor.unk_id())
        writer.add_pad_token_id(processor.unk_id())  # the pad token training used
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        tensors = gguf_tensors(model_config, state)
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
