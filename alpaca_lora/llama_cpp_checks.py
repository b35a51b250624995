"""llama.cpp itself, through llama-cpp-python: the quantizer for llama.cpp's own types, and the checks of an exported
GGUF file (its tokens, its logits, its quantization loss and its chat template) against what was trained.

Every check raises a ValueError naming what differs; export.py runs them on the staged file, so a file that fails
one is never renamed into place.
"""

import ctypes
from pathlib import Path

import numpy as np

# --gguf_type -> llama_ftype, for the types only llama.cpp's quantizer writes (the gguf package cannot write k-quants)
QUANTIZED_TYPES = {"q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
# how much the mean log-probability per token of a held-out text may drop from the f16 file's, in nats
LOG_PROB_BOUNDS = {"q4_0": 0.25, "q4_k_m": 0.2, "q5_k_m": 0.1, "q6_k": 0.05}
INSTALL = 'pip install -e ".[llama-cpp]" (builds llama.cpp, about 5 minutes)'


def llama_cpp_module(flag: str):
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"{flag} needs llama-cpp-python, which is not installed: {INSTALL}") from None
    return llama_cpp


def quantize(source: Path, target: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer: `source` (an f16 GGUF) to `target` in `gguf_type`."""
    llama_cpp = llama_cpp_module(f"--gguf_type {gguf_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED_TYPES[gguf_type]
    params.nthread = 0
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise ValueError(f"--gguf_type {gguf_type}: llama.cpp's quantizer failed on {source.name}; nothing was written")


def load(path: Path):
    llama_cpp = llama_cpp_module("checking the GGUF file")
    # logits_all keeps n_ctx x vocabulary floats (2048 x 152K would be 1.2 GB): the checks need under 256 positions
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, seed=0)


def check_tokens(llm, tokenizer, texts: list[str]) -> None:
    """llama.cpp splits each text (special tokens parsed, BOS added where the model wants one) into the ids training
    made of it."""
    from .chat_template import bos_ids

    for text in texts:
        bos = bos_ids(tokenizer, text)
        expected = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        got = llm.tokenize(text.encode(), add_bos=bool(bos), special=True)
        if got != expected:
            raise ValueError(f"--gguf: llama.cpp tokenizes {text[:40]!r} as {got[:8]}..., the tokenizer as "
                             f"{expected[:8]}...; nothing was written")


def check_chat_prompts(llm, prompts: list[tuple[list[dict], str]]) -> None:
    """The chat template llama.cpp reads from the file, rendered as llama-cpp-python's create_chat_completion renders
    it (its Jinja formatter, the file's BOS and EOS text), gives training's prompt for each conversation so far."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if not prompts:  # trained on a prompt template (Alpaca's): the file carries no chat template
        return
    # bos_token and eos_token as Llama.__init__ gives them to the formatter
    bos, eos = (llm._model.token_get_text(token) if token != -1 else "" for token in (llm.token_bos(), llm.token_eos()))
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
    for messages, expected in prompts:
        got = formatter(messages=messages).prompt
        if got != expected:
            raise ValueError(f"--gguf: llama.cpp's chat template renders the conversation as {got[-60:]!r}, training "
                             f"as {expected[-60:]!r}; nothing was written")


def logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` [len(ids), vocab]."""
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)], dtype=np.float32)


def check_logits(got: np.ndarray, expected: np.ndarray, relative: float = 1e-2) -> float:
    """llama.cpp's logits for the probe are the merged model's, within `relative` of their largest value (its KV
    cache is f16; a wrong layout or hyperparameter is off by tens of percent)."""
    error, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    if error > relative * scale:
        raise ValueError(f"--gguf: llama.cpp's logits for the probe differ from the merged model's by {error:.3g} "
                         f"(allowed {relative * scale:.3g}); nothing was written")
    return error


def mean_log_prob(llm, ids: list[int]) -> float:
    """Mean log-probability llama.cpp gives each next token of `ids` (minus the mean loss on a held-out text)."""
    scores = logits(llm, ids)[:-1].astype(np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    return float(log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


def check_quantization_loss(quantized: float, reference: float, gguf_type: str) -> float:
    drop = reference - quantized
    if drop > LOG_PROB_BOUNDS[gguf_type]:
        raise ValueError(f"--gguf_type {gguf_type}: the quantized file's mean log-probability per token of the "
                         f"held-out text is {drop:.3f} nats below the f16 file's (allowed {LOG_PROB_BOUNDS[gguf_type]}); "
                         "nothing was written")
    return drop


def check_gguf(path: Path, f16_path: Path | None, gguf_type: str, tokenizer, texts: list[str],
               prompts: list[tuple[list[dict], str]], probe_ids: list[int], reference_logits: np.ndarray,
               held_out_ids: list[int]) -> dict:
    """Every check of a staged GGUF file: its tokens for `texts`; its chat template's prompt for each of `prompts`
    (messages, training's prompt text); for an f32/f16 file, its logits for the probe; for a file llama.cpp quantized,
    its mean log-probability of the held-out ids against the f16 file's."""
    llm = load(path)
    check_tokens(llm, tokenizer, texts + [text for _, text in prompts])
    check_chat_prompts(llm, prompts)
    report = {"tokens_checked": len(texts) + len(prompts), "chat_prompts_checked": len(prompts)}
    if gguf_type in ("f32", "f16"):
        report["max_logit_error"] = check_logits(logits(llm, probe_ids), reference_logits)
    if f16_path is not None:
        quantized, reference = mean_log_prob(llm, held_out_ids), mean_log_prob(load(f16_path), held_out_ids)
        report.update(mean_log_prob=quantized, f16_mean_log_prob=reference,
                      log_prob_drop=check_quantization_loss(quantized, reference, gguf_type),
                      log_prob_bound=LOG_PROB_BOUNDS[gguf_type])
    del llm
    return report
