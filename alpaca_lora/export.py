"""Export: merge the adapter into the base and write it for deployment, checking the result before saying so.

    base + adapter --merge--> merged weights --> Hugging Face folder (safetensors shards, tokenizer)
                                             --> GGUF file for llama.cpp (f32, f16, bf16, q8_0)
                                             --> Meta's layout (consolidated.00.pth + params.json)

Every output is written under a temporary name, verified, and only then renamed into place: the merged
model must reproduce base + adapter on a probe prompt and must differ from the bare base (an export that
merged nothing, as alpaca-lora's llama.cpp script does with current peft, is an error, not a file).
"""

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter_folder import AdapterDescription, arguments_table, describe_adapter
from .errors import first_line
from .files import staged
from .llama_layout import meta_state_dict, meta_to_hf_rotary
from .gguf_export import PROBE_TEXT as PROBE
from .gguf_export import export_gguf
from .llama_cpp_checks import QUANTIZED_TYPES, llama_cpp_module
from .model import load_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
EXAMPLE_VALUES = {"lora_weights": "./lora-alpaca", "base_model": "huggyllama/llama-7b", "output_dir": "./merged",
                  "gguf": "./model.gguf", "meta_checkpoint": "./meta", "max_shard_size": "2GB"}


@dataclass
class ExportConfig:
    """Every flag of export_hf.py, with its default."""

    lora_weights: str = field(default="", metadata={"help": "adapter folder from finetune.py (required)"})
    base_model: str = field(default="", metadata={"help": "base model (default: the one the adapter names)"})
    output_dir: str = field(default="", metadata={"help": "write a merged Hugging Face checkpoint here"})
    dtype: str = field(default="float16", metadata={"help": "weights of the HF checkpoint: float16, bfloat16 or float32"})
    max_shard_size: str = field(default="2GB", metadata={"help": "largest safetensors shard"})
    gguf: str = field(default="", metadata={"help": "also (or only) write a GGUF file for llama.cpp here"})
    gguf_type: str = field(default="f16", metadata={
        "help": "GGUF tensor type: f32, f16, bf16, q8_0, or llama.cpp's q4_0, q4_k_m, q5_k_m, q6_k (those need "
                "llama-cpp-python)"})
    meta_checkpoint: str = field(default="", metadata={"help": "also (or only) write Meta's layout into this folder"})
    dequantize: bool = field(default=False, metadata={
        "help": "adapter trained on an 8/4-bit base: merge into the dequantized weights it was trained against"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty output"})


def export(config: ExportConfig, write=print) -> dict:
    """Merge and write every output the flags ask for; returns what was measured."""
    _validate(config)
    adapter = describe_adapter(config.lora_weights)
    base_model = adapter.base_model_or(config.base_model)
    if adapter.base_model and not _same_model(base_model, adapter.base_model):
        write(f"warning: merging onto {base_model}, but the adapter was trained on {adapter.base_model}; the result "
              "is not what was trained, and the model card says so")
    trained_on = adapter.summary.precision if adapter.summary else "unknown"
    cpu = torch.device("cpu")

    from peft import PeftModel
    from transformers import AutoTokenizer

    base = load_model(base_model, None, False, cpu)  # full precision, fp32
    # the adapter folder's tokenizer is the one trained with: its pad token and chat template travel into the export
    trained_tokenizer = (Path(config.lora_weights).expanduser() / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(config.lora_weights if trained_tokenizer else base_model)
    probe = _probe_ids(tokenizer)
    base_logits = _logits(base, probe)
    try:
        peft_model = PeftModel.from_pretrained(base, config.lora_weights)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"--lora_weights {config.lora_weights}: does not fit --base_model {base_model} "
                         f"({first_line(error)}); pass the base it was trained on") from None
    report = {"base_model": base_model, "trained_on": trained_on}
    if trained_on in ("8bit", "4bit"):
        report["quantized"] = _compare_quantized_merges(base_model, config, trained_on, peft_model, probe, write)
        if config.dequantize:
            _replace_with_dequantized(peft_model, base_model, trained_on)
    reference = _logits(peft_model, probe)  # base + adapter, as trained (or dequantized, with --dequantize)
    merged = peft_model.merge_and_unload()
    merged_state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    adapter_effect = (reference - base_logits).abs().max().item()
    report["adapter_effect"] = adapter_effect
    write(f"adapter: largest change it makes to the probe logits: {adapter_effect:.4g}")

    if config.output_dir:
        report["hf"] = _export_hf(merged, tokenizer, config, adapter, base_model, reference, base_logits, write)
    if config.gguf:
        report["gguf"] = export_gguf(merged, merged_state, Path(config.lora_weights).expanduser(),
                                     Path(base_model).expanduser(), tokenizer,
                                     adapter.chat_template["source"] if adapter.chat_template else None,
                                     adapter.prompt_template, probe, reference, config, write)
        report["gguf"]["model_card"] = str(_gguf_model_card(config, adapter, base_model, report["gguf"]))
        write(f"wrote {report['gguf']['model_card']}: the GGUF file's model card")
    if config.meta_checkpoint:
        report["meta"] = _export_meta(merged.config, merged_state, base_model, config, write)
    return report


def _same_model(a: str, b: str) -> bool:
    """The same hub id, or the same folder however it is written."""
    local = [Path(name).expanduser() for name in (a, b)]
    return a == b or all(p.exists() for p in local) and local[0].resolve() == local[1].resolve()


def _validate(config: ExportConfig) -> None:
    for flag in ("lora_weights", "base_model", "output_dir", "gguf", "meta_checkpoint", "max_shard_size"):
        if isinstance(getattr(config, flag), bool):  # a flag given with no value: fire passes True
            raise ValueError(f"--{flag} needs a value, e.g. --{flag} {EXAMPLE_VALUES[flag]}")
    if not config.lora_weights:
        raise ValueError("--lora_weights is required: the adapter folder to merge")
    if not (config.output_dir or config.gguf or config.meta_checkpoint):
        raise ValueError("nothing to write: pass --output_dir, --gguf and/or --meta_checkpoint")
    if config.dtype not in DTYPES:
        raise ValueError(f"--dtype {config.dtype!r}: use float16, bfloat16 or float32")
    if config.gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf_type {config.gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")
    if config.gguf and config.gguf_type in QUANTIZED_TYPES:
        llama_cpp_module(f"--gguf_type {config.gguf_type}")  # fails now, not after the merge
    for flag, path in (("output_dir", config.output_dir), ("meta_checkpoint", config.meta_checkpoint)):
        target = Path(path).expanduser() if path else None
        if target and target.exists() and (not target.is_dir() or any(target.iterdir())) and not config.overwrite:
            raise ValueError(f"--{flag} {path}: exists and is not empty; pass --overwrite or choose another folder")
    if config.gguf and Path(config.gguf).expanduser().exists() and not config.overwrite:
        raise ValueError(f"--gguf {config.gguf}: exists; pass --overwrite or choose another path")


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False).logits[0].float().cpu()


def tolerance(dtype: torch.dtype, logits: torch.Tensor) -> float:
    """How far the exported logits may be from base + adapter: 1e-4 in fp32; for 16-bit weights, the rounding
    of every weight shows in the logits, so 2% of the largest logit plus 0.02."""
    if dtype == torch.float32:
        return 1e-4
    return 0.02 * logits.abs().max().item() + 0.02


def check_logits(what: str, got: torch.Tensor, reference: torch.Tensor, base_logits: torch.Tensor, allowed: float) -> dict:
    """An export must match base + adapter and must not match the bare base."""
    error = (got - reference).abs().max().item()
    from_base = (got - base_logits).abs().max().item()
    if error > allowed:
        raise ValueError(f"{what}: the exported model's probe logits are {error:.3g} from base + adapter "
                         f"(allowed {allowed:.3g}); nothing was written")
    if from_base <= allowed:
        effect = (reference - base_logits).abs().max().item()
        if effect > tolerance(torch.float32, reference):  # in fp32 it is not the base: the rounding swallowed it
            raise ValueError(f"{what}: the adapter changes the probe logits by at most {effect:.3g}, less than the "
                             f"rounding of 16-bit weights allows ({allowed:.3g}): written this way it could not be "
                             "told from the bare base; use --dtype float32 (or train the adapter longer); "
                             "nothing was written")
        raise ValueError(f"{what}: the exported model equals the bare base (largest difference {from_base:.3g}): "
                         "the adapter merged nothing; nothing was written")
    return {"max_abs_difference": error, "allowed": allowed, "difference_from_base": from_base}


def _export_hf(merged, tokenizer, config: ExportConfig, adapter: AdapterDescription, base_model: str, reference,
               base_logits, write) -> dict:
    from transformers import AutoModelForCausalLM

    target = Path(config.output_dir).expanduser()
    dtype = DTYPES[config.dtype]
    generation_config = Path(config.lora_weights).expanduser() / "generation_config.json"
    if generation_config.is_file():  # the tokens that end an answer: EOS and the chat template's end-of-turn marker
        from transformers import GenerationConfig

        merged.generation_config = GenerationConfig.from_pretrained(generation_config.parent)
    with staged(target) as staging:
        merged.to(dtype).save_pretrained(staging, max_shard_size=config.max_shard_size)  # GGUF/Meta use the fp32 copy
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)  # the weights as written, upcast
        check = check_logits(f"--output_dir {config.output_dir}", _logits(reloaded, _probe_ids(tokenizer)),
                             reference, base_logits, tolerance(dtype, reference))
        verification = (f"On a probe prompt the merged model's logits are within {check['max_abs_difference']:.3g} "
                        f"of base + adapter (allowed\n{check['allowed']:.3g}) and {check['difference_from_base']:.3g} "
                        "away from the bare base's.")
        (staging / "README.md").write_text(_model_card(
            config, adapter, base_model, f"saved as {config.dtype}",
            f"Load it with `AutoModelForCausalLM.from_pretrained(this_folder)`; {_prompting(adapter)}.", verification))
    write(f"wrote {target}: {config.dtype} weights; probe logits within {check['max_abs_difference']:.3g} of base + "
          f"adapter (allowed {check['allowed']:.3g}), {check['difference_from_base']:.3g} from the bare base")
    return check


def _probe_ids(tokenizer) -> torch.Tensor:
    return tokenizer(PROBE, return_tensors="pt")["input_ids"]


def _compare_quantized_merges(base_model, config, trained_on, peft_model, probe, write) -> dict:
    """How far each merge choice is from what the adapter was trained with: the quantized base + adapter."""
    from peft import PeftModel

    quantized = PeftModel.from_pretrained(load_model(base_model, trained_on, False, torch.device("cpu")),
                                          config.lora_weights)
    trained = _logits(quantized, probe)
    full = _logits(peft_model, probe)
    _replace_with_dequantized(peft_model, base_model, trained_on)
    dequantized = _logits(peft_model, probe)
    _restore_full_precision(peft_model, base_model)
    result = {"full_precision_base": (full - trained).abs().max().item(),
              "dequantized_base": (dequantized - trained).abs().max().item()}
    write(f"the adapter was trained on a {trained_on} base; largest probe-logit distance from quantized base + adapter: "
          f"merged into full-precision weights {result['full_precision_base']:.4g} (default), into dequantized "
          f"weights {result['dequantized_base']:.4g} (--dequantize)")
    return result


def _replace_with_dequantized(peft_model, base_model: str, quantization: str) -> None:
    """Put the dequantized 8/4-bit weights in place of the full-precision ones in the adapter's base."""
    import bitsandbytes as bnb

    quantized = load_model(base_model, quantization, False, torch.device("cpu"))
    replacements = {}
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            replacements[name] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        elif isinstance(module, bnb.nn.Linear8bitLt):
            state = module.weight
            replacements[name] = (state.data.float() * state.SCB.float()[:, None] / 127.0)
    _set_base_linear_weights(peft_model, replacements)


def _restore_full_precision(peft_model, base_model: str) -> None:
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    _set_base_linear_weights(peft_model, {name: module.weight.data for name, module in original.named_modules()
                                          if isinstance(module, torch.nn.Linear)})


def _set_base_linear_weights(peft_model, weights: dict) -> None:
    modules = dict(peft_model.get_base_model().named_modules())
    for name, weight in weights.items():
        module = modules.get(name)
        target = getattr(module, "base_layer", module)  # a LoRA-wrapped layer keeps the original as base_layer
        if target is not None and hasattr(target, "weight") and target.weight.shape == weight.shape:
            target.weight.data = weight.to(target.weight.dtype).clone()


def _export_meta(model_config, state: dict, base_model: str, config: ExportConfig, write) -> dict:
    target = Path(config.meta_checkpoint).expanduser()
    dtype = DTYPES[config.dtype]
    weights = meta_state_dict(model_config, state, dtype)
    hidden, intermediate = model_config.hidden_size, model_config.intermediate_size
    params = {"dim": hidden, "n_heads": model_config.num_attention_heads, "n_layers": model_config.num_hidden_layers,
              "norm_eps": model_config.rms_norm_eps, "vocab_size": model_config.vocab_size,
              "rope_theta": getattr(model_config, "rope_theta", None) or 10000.0}
    if (model_config.num_key_value_heads or params["n_heads"]) != params["n_heads"]:
        params["n_kv_heads"] = model_config.num_key_value_heads
    # Meta derives the MLP width from dim and multiple_of; pick the multiple that reproduces this model's
    multiple = next((m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1)
                     if m * math.ceil(int(2 * 4 * hidden / 3) / m) == intermediate), None)
    if multiple is None:
        params["hidden_dim"] = intermediate  # no multiple_of gives it: say it outright
    else:
        params["multiple_of"] = multiple
    with staged(target) as staging:
        staging.mkdir(parents=True)
        torch.save(weights, staging / "consolidated.00.pth")
        (staging / "params.json").write_text(json.dumps(params, indent=2))
        tokenizer_model = Path(base_model) / "tokenizer.model"
        if tokenizer_model.is_file():
            shutil.copy(tokenizer_model, staging / "tokenizer.model")
        # verify: the file read back and laid out as HF again is the merged model, tensor for tensor
        saved = torch.load(staging / "consolidated.00.pth", weights_only=True)
        worst = 0.0
        for layer in range(model_config.num_hidden_layers):
            q = meta_to_hf_rotary(saved[f"layers.{layer}.attention.wq.weight"].float(), params["n_heads"])
            worst = max(worst, (q - state[f"model.layers.{layer}.self_attn.q_proj.weight"]).abs().max().item())
        allowed = 0.0 if dtype == torch.float32 else 1e-2 * max(v.abs().max().item() for v in state.values())
        if worst > allowed or len(saved) != len(weights):
            raise ValueError(f"--meta_checkpoint {config.meta_checkpoint}: the written tensors do not read back as "
                             f"the merged weights ({worst:.3g}); nothing was written")
    write(f"wrote {target}: consolidated.00.pth ({len(weights)} tensors, {config.dtype}) and params.json")
    return {"tensors": len(weights), "max_abs_difference_q": worst}


def _prompting(adapter: AdapterDescription) -> str:
    if adapter.chat_template:
        return (f"prompt it with `tokenizer.apply_chat_template` (this folder's tokenizer carries the chat template "
                f"`{adapter.chat_template['name']}` it was trained with; generation stops at the ids in "
                "generation_config.json)")
    return f"prompt it with the `{adapter.prompt_template or 'alpaca'}` template"


def _gguf_model_card(config: ExportConfig, adapter: AdapterDescription, base: str, report: dict) -> Path:
    """NAME.md beside NAME.gguf: the model card of the file, with what llama.cpp's checks measured."""
    from .files import write_text_atomically
    from .gguf_export import described_checks

    gguf_path = Path(config.gguf).expanduser()
    checked = report.get("llama_cpp")
    verification = (f"Every tensor read back from the file within {report['max_abs_error']:.3g} of the merged weights; "
                    + (f"llama.cpp: {described_checks(checked)}." if checked else
                       "not checked by llama.cpp (llama-cpp-python was not installed)."))
    how = (f"Run it with llama.cpp (`llama-cli -m {gguf_path.name} -cnv`, `llama-server -m {gguf_path.name}`) or Ollama "
           f"(`ollama create NAME -f {Path(report['modelfile']).name}`).")
    card = gguf_path.with_suffix(".md")
    write_text_atomically(card, _model_card(config, adapter, base, f"as a {config.gguf_type} GGUF file", how,
                                            verification))
    return card


def _model_card(config: ExportConfig, adapter: AdapterDescription, base: str, saved_as: str, how_to_use: str,
                verification: str) -> str:
    summary = adapter.summary
    data = json.dumps(dataclasses.asdict(summary.data), indent=1) if summary else "unknown (no training summary)"
    return f"""---
base_model: {base}
tags: [alpaca, lora, merged, alpaca-lora]
license: other
---

# {base} + LoRA adapter, merged

The adapter `{config.lora_weights}` merged into `{base}` by alpaca-lora's `export_hf.py`, {saved_as}.
{'' if not adapter.base_model or _same_model(base, adapter.base_model) else f"**The adapter was trained on `{adapter.base_model}`, not on `{base}`**: this merge is not the model that was trained."}
{how_to_use}

## Verification
{verification}

## Training data and evaluation
{data}

Final validation loss: {summary.final_validation_loss if summary else 'unknown'}

## Training arguments
{arguments_table(summary.arguments) if summary else 'unknown (no training summary)'}

## Licences
The base model's licence applies to these weights. The Stanford Alpaca data is CC BY-NC 4.0 (non-commercial); data
generated through the OpenAI API is subject to its terms of use.

## Limitations
For research. Such models hallucinate, follow harmful instructions and reproduce biases; not evaluated for safety.
"""
