"""Configuration: every flag of finetune.py with its default and help, and the one validation of them all.

`TrainConfig.validated()` returns a normalised copy or raises a ValueError naming the flag, the bad value and
a fix; the command line turns that into its one-line error. Nothing here loads anything (the template is
read, so that an unknown one fails before the model is loaded).
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .chat_template import check_chat_template_name
from .templates import load_template

WANDB_WATCH_CHOICES = ("", "false", "gradients", "parameters", "all")


@dataclass
class TrainConfig:
    """Every flag of finetune.py, with its default: the one place defaults live."""

    base_model: str = field(default="", metadata={
        "help": "hub id or local folder of a causal LM (LLaMA 1/2/3, Mistral, Qwen, Gemma, Phi, ...) (required)"})
    data_path: str = field(default="yahma/alpaca-cleaned", metadata={
        "help": "a .json list or .jsonl file of Alpaca rows (self-instruct seed tasks too) or of conversations "
                "({messages: [{role, content}]} or ShareGPT {conversations: [{from, value}]}), or a dataset hub id"})
    output_dir: str = field(default="./lora-alpaca", metadata={"help": "where the adapter and checkpoints go"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "train into an --output_dir that holds a finished adapter or another run's checkpoints, replacing them"})
    batch_size: int = field(default=128, metadata={
        "help": "global batch: examples per optimizer step over all processes"})
    micro_batch_size: int = field(default=4, metadata={
        "help": "examples per group (batch_size / (micro_batch_size x processes) groups a step); packed, also the "
                "rows of a forward pass"})
    num_epochs: int = field(default=3, metadata={"help": "passes over the training rows"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    cutoff_len: int = field(default=256, metadata={"help": "longest example in tokens; longer ones are cut and get no EOS"})
    val_set_size: int = field(default=2000, metadata={"help": "rows held out for validation (seeded); 0 for none"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    fast_lora_dropout: bool = field(default=True, metadata={
        "help": "LoRA dropout from 16-bit random draws with a bool mask, inside lora_A so that its dropped input "
                "is not kept, input left in the autocast dtype (3x faster than peft's on a CPU, less memory; p "
                "rounded to 1/65536); False: peft's nn.Dropout"})
    lean_activations: bool = field(default=True, metadata={
        "help": "RMSNorms and gated MLPs keep only their inputs for backward (the norm also one fp32 number per row), "
                "not fp32 copies and the activation's output; on a CPU, attention in bf16 runs as matmuls with its "
                "probabilities recomputed in backward (eager attention's numbers, faster than SDPA's kernel there), "
                "and grouped key/value heads reach SDPA uncopied otherwise: less memory, one compiled kernel each "
                "way on large inputs; False: transformers' own"})
    lora_target_modules: object = field(default=None, metadata={
        "help": "linear layers to adapt, e.g. '[q_proj,v_proj]', or all-linear; default: q_proj,v_proj, or the fused "
                "qkv_proj where the model has one (Phi-3)"})
    train_on_inputs: bool = field(default=False, metadata={
        "help": "also train on the prompt tokens (default: loss on the response only)"})
    add_eos_token: bool = field(default=False, metadata={
        "help": "kept for alpaca-lora compatibility: every example that fits in cutoff_len ends with EOS anyway"})
    group_by_length: bool = field(default=False, metadata={"help": "batch examples of similar length (less padding)"})
    wandb_project: str = field(default="", metadata={"help": "log to this W&B project (WANDB_MODE=offline works)"})
    wandb_run_name: str = field(default="", metadata={"help": "W&B run name"})
    wandb_watch: str = field(default="", metadata={"help": "W&B watch: false, gradients, parameters or all"})
    wandb_log_model: str = field(default="", metadata={"help": "true: upload the final adapter to W&B as an artifact"})
    resume_from_checkpoint: str = field(default="", metadata={
        "help": "a checkpoint-N folder to resume exactly, or an adapter folder to start from its weights"})
    prompt_template_name: str = field(default="alpaca", metadata={
        "help": "Alpaca prompt template in templates/ (alpaca, alpaca_legacy, alpaca_short) or a template .json path; "
                "used for Alpaca rows when no --chat_template is given"})
    chat_template: str = field(default="", metadata={
        "help": "chat template: tokenizer (the base tokenizer's own), alpaca, chatml, gemma, llama3, mistral, phi3, or a "
                ".jinja path; default: the tokenizer's own for conversation data, none (--prompt_template_name) for "
                "Alpaca rows"})
    load_8bit: bool | None = field(default=None, metadata={
        "help": "8-bit base weights (bitsandbytes); default: on with a CUDA GPU, off otherwise"})
    load_4bit: bool = field(default=False, metadata={"help": "4-bit NF4 base weights (QLoRA)"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised LoRA scaling (alpha / sqrt(r))"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: num_epochs decides)"})
    seed: int = field(default=42, metadata={"help": "seed for the split, the shuffles, LoRA init and dropout"})
    logging_steps: int = field(default=10, metadata={"help": "print and log the loss every N steps"})
    eval_steps: int = field(default=200, metadata={"help": "validation loss every N steps (and at the end)"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int = field(default=3, metadata={"help": "checkpoints kept (the newest)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear learning-rate warmup steps"})
    lr_scheduler: str = field(default="linear", metadata={"help": "schedule after warmup: linear, cosine or constant"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: none)"})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "recompute activations: less memory, ~30% slower; default: on for an 8-/4-bit base (as alpaca-lora "
                "does through peft), off otherwise"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast; default: on where bf16 is fast (Ampere+ GPU, AVX512-BF16 CPU), fp32 otherwise"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "drop rows that fail validation instead of stopping"})
    packing: bool = field(default=True, metadata={
        "help": "lay a step's examples end to end (attention kept within each example) in rows of up to cutoff_len "
                "tokens, micro_batch_size rows per pass; False: one padded row per example"})
    torch_compile: bool = field(default=False, metadata={"help": "compile the decoder with torch.compile"})
    tokenized_cache_dir: str = field(default="~/.cache/alpaca-lora/tokenized", metadata={
        "help": "where tokenized data is cached (keyed by rows, tokenizer, template, cutoff); '' turns it off"})

    def validated(self) -> "TrainConfig":
        """A copy with normalised values, or a ValueError naming the flag, its value and a fix."""
        c = dataclasses.replace(self)
        if not isinstance(c.base_model, str) or not c.base_model:
            raise ValueError("--base_model is required: a hub id or a local model folder")
        if Path(c.base_model).expanduser().exists():  # recorded absolute: the adapter must find it from anywhere
            c.base_model = str(Path(c.base_model).expanduser().resolve())
        for name in ("data_path", "output_dir", "prompt_template_name", "chat_template", "wandb_project", "wandb_run_name",
                     "resume_from_checkpoint", "lr_scheduler", "tokenized_cache_dir"):
            setattr(c, name, "" if getattr(c, name) in (None, False) else str(getattr(c, name)))
        for name, minimum in (("batch_size", 1), ("micro_batch_size", 1), ("num_epochs", 1), ("cutoff_len", 2),
                              ("val_set_size", 0), ("lora_r", 1), ("lora_alpha", 1), ("max_steps", 0),
                              ("logging_steps", 1), ("eval_steps", 1), ("save_steps", 1), ("save_total_limit", 1),
                              ("warmup_steps", 0), ("seed", 0)):
            value = getattr(c, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"--{name} {value!r}: must be a whole number >= {minimum}")
        for name, low, high in (("learning_rate", 0, math.inf), ("lora_dropout", 0, 1), ("weight_decay", 0, math.inf),
                                ("max_grad_norm", 0, math.inf)):
            value = getattr(c, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
                raise ValueError(f"--{name} {value!r}: must be a number in [{low}, {high})")
        if c.learning_rate == 0:
            raise ValueError("--learning_rate 0: must be positive, e.g. 3e-4")
        for name in ("overwrite_output_dir", "train_on_inputs", "add_eos_token", "group_by_length", "load_4bit", "use_dora", "use_rslora",
                     "skip_bad_rows", "packing", "torch_compile", "fast_lora_dropout", "lean_activations"):
            if not isinstance(getattr(c, name), bool):
                raise ValueError(f"--{name} {getattr(c, name)!r}: must be True or False")
        for name in ("load_8bit", "bf16", "gradient_checkpointing"):
            if getattr(c, name) is not None and not isinstance(getattr(c, name), bool):
                raise ValueError(f"--{name} {getattr(c, name)!r}: must be True or False (or left out for auto)")
        if c.load_8bit and c.load_4bit:
            raise ValueError("--load_8bit and --load_4bit: choose one")
        if c.batch_size % c.micro_batch_size:
            raise ValueError(f"--batch_size {c.batch_size} is not divisible by --micro_batch_size {c.micro_batch_size}; "
                             "make batch_size a multiple of micro_batch_size")
        c.lora_target_modules = _target_modules(c.lora_target_modules)
        c.wandb_watch = str(c.wandb_watch or "").lower()
        if c.wandb_watch not in WANDB_WATCH_CHOICES:
            raise ValueError(f"--wandb_watch {c.wandb_watch!r}: use one of false, gradients, parameters, all")
        c.wandb_log_model = str(c.wandb_log_model or "").lower()
        if c.wandb_log_model not in ("", "false", "true", "checkpoint", "end"):
            raise ValueError(f"--wandb_log_model {c.wandb_log_model!r}: use true or false")
        if c.lr_scheduler not in ("linear", "cosine", "constant"):
            raise ValueError(f"--lr_scheduler {c.lr_scheduler!r}: use linear, cosine or constant")
        load_template(c.prompt_template_name)  # an unknown template fails here, before any loading
        check_chat_template_name(c.chat_template)
        return c


def _target_modules(value) -> list[str] | str | None:
    """'[q_proj,v_proj]', 'q_proj,v_proj', a list or 'all-linear' -> what peft's LoraConfig takes; None (the default)
    stays None: model.py picks per model."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if value.strip() == "all-linear":
            return "all-linear"
        value = [part.strip(" '\"") for part in value.strip("[]() ").split(",")]
    names = list(value) if isinstance(value, (list, tuple)) else None
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"--lora_target_modules {value!r}: give module names like '[q_proj,v_proj]' or all-linear")
    return names
