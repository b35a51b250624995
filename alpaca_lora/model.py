"""Model: the base model and tokenizer from a hub id or a folder, optionally 8-/4-bit, with LoRA attached."""

import ctypes
import re
import types
from pathlib import Path

import torch

from .errors import first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def fast_bf16_available(device: torch.device) -> bool:
    """Whether bf16 matmuls run faster than fp32 here: Ampere+ GPUs, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = _cpu_info()
        except OSError:  # not Linux: no cheap way to tell, so stay with fp32
            return False
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))
    return False


def _cpu_info() -> str:
    return Path("/proc/cpuinfo").read_text()


def check_base_model(base_model: str) -> None:
    """A missing local folder is named as such instead of being looked up on the hub."""
    if Path(base_model).expanduser().exists():
        return
    if base_model.startswith((".", "/", "~")) or not _HUB_ID.match(base_model):
        raise ValueError(f"--base_model {base_model}: no such folder; pass a local model folder or a hub id")


def _loading_error(base_model: str, what: str, error: Exception) -> ValueError:
    reason = first_line(error)
    return ValueError(f"--base_model {base_model}: could not load its {what} ({reason}); "
                      "pass a local folder holding a causal language model, or a hub id reachable from here")


def load_tokenizer(base_model: str):
    """The fast tokenizer, with a pad token that is not EOS (padding must never mask the EOS label)."""
    from transformers import AutoTokenizer

    check_base_model(base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as error:
        raise _loading_error(base_model, "tokenizer", error) from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--base_model {base_model}: the tokenizer has no EOS token; a model trained without one never stops")
    set_pad_token(tokenizer, avoid=[tokenizer.eos_token_id], source=base_model)
    tokenizer.padding_side = "right"
    release_loading_leftovers(tokenizer)
    return tokenizer


def release_loading_leftovers(tokenizer) -> None:
    """Give back the memory that loading a large vocabulary leaves behind, for the rest of a run or a server's life.

    transformers 5 builds a Llama, Qwen2 or Gemma tokenizer's Rust model from a Python dict of the vocabulary and a
    list of merges, and keeps both (`_vocab`, `_merges`) though nothing reads them again: the Rust tokenizer answers
    get_vocab and writes tokenizer.json. Parsing tokenizer.json also leaves its freed Python objects in the C heap,
    which glibc returns to the system only when asked. Measured: a loaded Qwen2 tokenizer (151,936 tokens) held
    111 MB, 38 MB after this; Llama 3's (128,256), 137 and 48 MB."""
    if getattr(tokenizer, "_tokenizer", None) is not None:  # the Rust tokenizer is built
        for construction_copy in ("_vocab", "_merges"):
            if hasattr(tokenizer, construction_copy):
                setattr(tokenizer, construction_copy, None)
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, musl, Windows): the heap stays as it is
        pass


def set_pad_token(tokenizer, avoid: list[int], source: str) -> None:
    """A pad token that is none of the `avoid` ids (EOS, end-of-turn tokens): padding must never look like a stop.

    Padded positions are masked out of attention and loss, so any token serves. Tried in turn: the tokenizer's own
    pad, its unk (alpaca-lora pads LLaMA with <unk>), an added token meant for padding (Llama 3's
    <|finetune_right_pad_id|>, Qwen's <|fim_pad|> or [PAD151646]), a reserved special token."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in avoid:
        return
    added = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items())]
    candidates = ([tokenizer.unk_token] + [t for t in added if "pad" in t.lower()]
                  + [t for t in added if "reserved" in t.lower()])
    usable = [t for t in candidates if t is not None and tokenizer.convert_tokens_to_ids(t) not in avoid + [
        tokenizer.bos_token_id]]
    if not usable:
        raise ValueError(f"--base_model {source}: the tokenizer has no token to pad with that is not EOS or an "
                         "end-of-turn token; add a pad token to its tokenizer_config.json")
    tokenizer.pad_token = usable[0]


# attention implementations that take packed examples apart by their restarting position_ids in any layout
# (flash-attention's variable-length kernel), rather than through a mask over each row (SDPA)
VARLEN_ATTENTION = ("flash_attention_2",)


def attention_implementation(device: torch.device, bf16: bool) -> str:
    """flash-attention 2 where it is installed and can run (a CUDA GPU, bf16 compute), else PyTorch's SDPA (which
    load_model turns into eager attention for a model SDPA cannot run: Gemma 2, whose attention logits are capped).

    All keep packed examples apart: SDPA and eager through the block-diagonal causal mask that transformers builds
    from restarting position_ids, flash-attention through its variable-length kernel, which transformers calls when
    one row holds several examples (batching.passes puts each pass in one row for it)."""
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if device.type == "cuda" and bf16 and is_flash_attn_2_available() else "sdpa"


def load_model(base_model: str, quantization: str | None, bf16: bool, device: torch.device,
               attention: str = "sdpa"):
    """The base model on `device`; weights in bf16 or fp32, or 8-/4-bit through bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_base_model(base_model)
    dtype = torch.bfloat16 if bf16 else torch.float32
    quantization_config = None
    if quantization == "8bit":
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization == "4bit":  # QLoRA's recipe: NF4 with double quantization
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_model, dtype=dtype, quantization_config=quantization_config, device_map={"": device},
            # None: transformers' default, SDPA where the model supports it, else eager
            attn_implementation=None if attention == "sdpa" else attention)
    except (OSError, ValueError) as error:
        raise _loading_error(base_model, "weights", error) from None
    if quantization == "4bit" and device.type == "cpu":
        _keep_4bit_cpu_weights_unpacked(model)
    model.config.use_cache = False  # training never reuses the KV cache
    return model


def _keep_4bit_cpu_weights_unpacked(model) -> None:
    """bitsandbytes repacks 4-bit weights for AVX512-BF16 kernels on the first eval-mode forward, after
    which the LoRA gradients silently become None or wrong. Opting out before any forward keeps them right."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _dropped(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.where(keep, x * scale, 0)


class LoraInputDropout(torch.nn.Module):
    """Dropout on a LoRA layer's input, its random numbers drawn 16 bits per element, its mask kept as bool.

    torch's dropout draws each element on its own (bernoulli_: 2.7 ms for a [1024, 512] input on this
    project's CPU, 13% of a step with LoRA on every linear layer) and keeps its mask in the input's dtype;
    here one 64-bit draw serves four elements (0.9 ms) and only the bool mask is kept. The drop probability is
    rounded to a multiple of 1/65536 (0.05 -> 0.049988) and the kept inputs are scaled by 1 / (1 - that
    probability), so the output's expectation is the input, as with torch's dropout. use_fast_lora_dropout puts
    it inside lora_A (DroppedLinear); as a module of its own it serves peft's variants (DoRA), whose forward takes
    the dropped input.
    """

    def __init__(self, p: float):
        super().__init__()
        # of the 65,536 values a 16-bit draw takes, this many drop the element (at least one value keeps it:
        # a p within 1/131072 of 1 would otherwise round to dropping everything and a scale of 1/0)
        drops = min(round(p * 2 ** 16), 2 ** 16 - 1)
        self.p, self.scale, self.drop_below = drops / 2 ** 16, 1 / (1 - drops / 2 ** 16), drops - 2 ** 15

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """bool, x's shape: True where the element is kept, drawn from torch's global generator."""
        # random_ over the whole int64 range: its default range leaves the top bit 0, which would make every
        # fourth 16-bit lane non-negative and never drop its element
        draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
        draws.random_(-2 ** 63, 2 ** 63 - 1)
        return draws.view(torch.int16)[:x.numel()].view(x.shape) >= self.drop_below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        # autograd saves the mask alone: the input's gradient is where(keep, grad * scale, 0)
        return _dropped(x, self.keep_mask(x), self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DroppedLinear(torch.autograd.Function):
    """F.linear(where(keep, x * scale, 0), weight) for lora_A, keeping x and the bool mask for backward.

    peft's LoRA layer keeps each adapted projection's dropped input (for lora_A's gradient) besides the mask:
    3 bytes an element in bf16, per projection. Here backward drops x again, so what is kept is the mask and x
    itself, which the projections reading the same input (q, k and v; gate and up) share: with LoRA on q and v,
    4 bytes an element instead of 6 (14 MB a packed pass on the Qwen3-0.6B shape, 22 MB on Gemma-3-270M's).
    Forward and backward run the ops of the unfused layer in the same dtypes (autocast's, as in the forward), so
    the numbers are the same.
    """

    @staticmethod
    def forward(ctx, x, weight, keep, scale: float):
        device = x.device.type
        ctx.autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.scale = scale
        ctx.save_for_backward(x, keep, weight)
        return torch.nn.functional.linear(_dropped(x, keep, scale), weight)  # under autocast, in its dtype

    @staticmethod
    def backward(ctx, grad_output):
        x, keep, weight = ctx.saved_tensors
        dropped = _dropped(x, keep, ctx.scale)
        dtype = ctx.autocast_dtype or torch.promote_types(dropped.dtype, weight.dtype)
        grad_output = grad_output.to(dtype)
        # [..., r] x [..., in] -> [r, in], and [..., r] x [r, in] -> [..., in]
        grad_weight = (grad_output.flatten(0, -2).T @ dropped.to(dtype).flatten(0, -2)).to(weight.dtype)
        grad_dropped = (grad_output @ weight.to(dtype)).to(x.dtype)
        return torch.where(keep, grad_dropped, 0) * ctx.scale, grad_weight, None, None


def _dropped_lora_a_forward(self, x: torch.Tensor) -> torch.Tensor:
    """lora_A's forward with its input dropout inside it (self: peft's lora_A, an nn.Linear without bias)."""
    dropout = self.input_dropout
    if not dropout.training:
        return torch.nn.functional.linear(x, self.weight)
    return DroppedLinear.apply(x, self.weight, dropout.keep_mask(x), dropout.scale)


def use_fast_lora_dropout(model, keep_input_dtype: bool) -> None:
    """Move peft's LoRA dropout (torch's nn.Dropout) into lora_A as LoraInputDropout + DroppedLinear (for a variant
    such as DoRA, swap it for LoraInputDropout); with keep_input_dtype (under autocast) also stop peft copying each
    LoRA input to the adapter's fp32: autocast casts it back to bf16 for the matmul anyway, so the copy only cost
    time and memory."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, dropout in module.lora_dropout.items():
                if type(dropout) is not torch.nn.Dropout:
                    continue
                lora_a, fast = module.lora_A[name], LoraInputDropout(dropout.p).train(dropout.training)
                if name in module.lora_variant or type(lora_a) is not torch.nn.Linear or lora_a.bias is not None:
                    module.lora_dropout[name] = fast  # a variant (DoRA) takes the dropped input itself
                    continue
                lora_a.input_dropout = fast
                lora_a.forward = types.MethodType(_dropped_lora_a_forward, lora_a)
                module.lora_dropout[name] = torch.nn.Identity()
            if keep_input_dtype:
                module.cast_input_dtype_enabled = False


def attach_lora(model, *, r: int, alpha: int, dropout: float, target_modules, use_dora: bool, use_rslora: bool,
                gradient_checkpointing: bool, quantization: str | None):
    """Wrap the base in a peft LoRA model; only the adapter weights (kept in fp32) are trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # bitsandbytes' 8-bit matmul keeps its input on the autograd context as a plain attribute, out of reach
    # of the non-reentrant checkpoint's hooks: only the reentrant form (forward under no_grad) frees it.
    # The non-reentrant form needs no input gradients and is right for everything else.
    checkpointing_kwargs = {"use_reentrant": quantization == "8bit"}
    if quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    target_modules = lora_targets(model, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
                        task_type="CAUSAL_LM", use_dora=use_dora, use_rslora=use_rslora)
    return get_peft_model(model, config)


def linear_layer_names(model) -> list[str]:
    """The distinct names (last part) of the model's linear layers, bitsandbytes' 8-/4-bit ones included."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def lora_targets(model, target_modules):
    """--lora_target_modules checked against the model: None (the default) is alpaca-lora's q_proj,v_proj where the
    model has them, else its fused attention projection (Phi-3's qkv_proj); a name matching no linear layer is an
    error listing the model's."""
    names = linear_layer_names(model)
    full_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if target_modules == "all-linear":
        return target_modules
    if target_modules is None:
        for default in (["q_proj", "v_proj"], ["qkv_proj"]):
            if set(default) <= set(names):
                return default
        raise ValueError(f"--lora_target_modules: this model has no q_proj/v_proj nor a fused qkv_proj; name some of "
                         f"its linear layers ({', '.join(names)}) or pass all-linear")
    unknown = [name for name in target_modules if not any(f == name or f.endswith("." + name) for f in full_names)]
    if unknown:
        raise ValueError(f"--lora_target_modules {','.join(target_modules)}: {', '.join(unknown)} matches no linear "
                         f"layer of this model; its linear layers are {', '.join(names)} (or pass all-linear)")
    return target_modules
