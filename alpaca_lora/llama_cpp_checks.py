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
    return llama_cpp.Llama(model_path=str(path), n_ctx=2048, logits_all=True, verbose=False, seed=0)


def check_tokens(llm, tokenizer, texts: list[str]) -> None:
    """llama.cpp splits each text (special tokens included) into the ids the model's own tokenizer gives."""
    for text in texts:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        if got != expected:
            raise ValueError(f"--gguf: llama.cpp tokenizes {text[:40]!r} as {got[:8]}..., the tokenizer as "
                             f"{expected[:8]}...; nothing was written")


def logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` [len(ids), vocab]."""
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)], dtype=np.float32)


def check_logits(got: np.ndarray, expected: np.ndarray, relative: float) -> float:
    """llama.cpp's logits for the probe are the merged model's, within `relative` of their largest value."""
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
