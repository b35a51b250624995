"""The vocabulary of a GGUF file, as llama.cpp reads it: SentencePiece ("llama": pieces, scores, types, whether a space
goes before the text) or byte-level BPE ("gpt2": tokens, merges, types, and the name of the pre-tokenizer llama.cpp
must split text with), the tokenizer's added tokens typed as llama.cpp's converter types them.
"""

import json
from pathlib import Path

# the byte-level pre-tokenizers llama.cpp knows, by their split regex in tokenizer.json
BPE_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


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


def add_vocabulary(writer, folder: Path, sentencepiece_model: Path | None, tokenizer, vocab_size: int,
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
    "first") put one before the very start of the input only, which llama.cpp cannot do; a chat template that starts
    with a special token (BOS as text, <|im_start|>) never gives the start to text, so in a chat no space ever comes,
    and that is what the file says when it carries such a template."""
    steps = json.dumps([definition.get("normalizer"), definition.get("pre_tokenizer")])
    if '"Prepend"' in steps or '"prepend_scheme": "always"' in steps:
        return True
    if '"prepend_scheme": "first"' not in steps:
        return False
    from .chat_template import ChatTemplate, render, starts_with_special_token

    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    return not (chat_template and starts_with_special_token(
        tokenizer, render(ChatTemplate("trained", chat_template), tokenizer, probe)))


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
