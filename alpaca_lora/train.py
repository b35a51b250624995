"""Train: fine-tune a LoRA adapter on Alpaca rows, read top to bottom.

    rows -> examples (data.py) -> base + LoRA (model.py) -> micro-batches -> loss -> AdamW steps
         -> checkpoints every save_steps, validation every eval_steps -> adapter folder

One optimizer step sees `batch_size` examples: `accumulation` micro-batches of `micro_batch_size` on
each of `world_size` processes. The step's loss is the mean over every target token of the whole
global batch (not a mean of per-micro-batch means), so the same examples give the same loss and
gradients whether they are split over 1 process or many, padded or packed.
"""

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from torch.utils.checkpoint import checkpoint

from .data import (IGNORE_INDEX, load_rows, pack_rows, packed_collate, pad_collate, plan_micro_batches, split_rows,
                   tokenize_rows_cached, validate_rows)
from .model import (VARLEN_ATTENTION, attach_lora, attention_implementation, fast_bf16_available, load_model,
                    load_tokenizer, use_fast_lora_dropout)
from .templates import load_template

CHECKPOINT_PREFIX = "checkpoint-"
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "training_summary.json"
VALIDATION_FILE = "validation_rows.json"
WANDB_WATCH_CHOICES = ("", "false", "gradients", "parameters", "all")


@dataclass
class TrainConfig:
    """Every flag of finetune.py, with its default: the one place defaults live."""

    base_model: str = field(default="", metadata={"help": "hub id or local folder of a LLaMA-family model (required)"})
    data_path: str = field(default="yahma/alpaca-cleaned", metadata={
        "help": "Alpaca-format .json list or .jsonl file (self-instruct seed tasks too), or a dataset hub id"})
    output_dir: str = field(default="./lora-alpaca", metadata={"help": "where the adapter and checkpoints go"})
    batch_size: int = field(default=128, metadata={
        "help": "global batch: examples per optimizer step over all processes"})
    micro_batch_size: int = field(default=4, metadata={"help": "examples per forward pass on one process"})
    num_epochs: int = field(default=3, metadata={"help": "passes over the training rows"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    cutoff_len: int = field(default=256, metadata={"help": "longest example in tokens; longer ones are cut and get no EOS"})
    val_set_size: int = field(default=2000, metadata={"help": "rows held out for validation (seeded); 0 for none"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    fast_lora_dropout: bool = field(default=True, metadata={
        "help": "LoRA dropout from 16-bit random draws with a bool mask, input left in the autocast dtype (3x faster "
                "than peft's on a CPU, less memory; p rounded to 1/65536); False: peft's nn.Dropout"})
    lora_target_modules: object = field(default=("q_proj", "v_proj"), metadata={
        "help": "linear layers to adapt, e.g. '[q_proj,v_proj]', or all-linear"})
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
        "help": "template in templates/ (alpaca, alpaca_legacy, alpaca_short) or a template .json path"})
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
        for name in ("data_path", "output_dir", "prompt_template_name", "wandb_project", "wandb_run_name",
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
        for name in ("train_on_inputs", "add_eos_token", "group_by_length", "load_4bit", "use_dora", "use_rslora",
                     "skip_bad_rows", "packing", "torch_compile", "fast_lora_dropout"):
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
        return c


def _target_modules(value) -> list[str] | str:
    """'[q_proj,v_proj]', 'q_proj,v_proj', a list or 'all-linear' -> what peft's LoraConfig takes."""
    if isinstance(value, str):
        if value.strip() == "all-linear":
            return "all-linear"
        value = [part.strip(" '\"") for part in value.strip("[]() ").split(",")]
    names = list(value) if isinstance(value, (list, tuple)) else None
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"--lora_target_modules {value!r}: give module names like '[q_proj,v_proj]' or all-linear")
    return names


# ---- the loss: replaceable; takes (model, batch) and gives the sum of the token losses over the batch's targets ----

LOGIT_CHUNK = 256  # most positions per LM-head chunk: at most [256 x vocab] logits at once (on a CPU, faster than 1024)
CHUNK_ROWS_STEP = 16


def head_chunk_rows(count: int) -> int:
    """Rows per LM-head chunk for `count` target positions: equal chunks of at most LOGIT_CHUNK rows, rounded up
    to a multiple of 16; the last chunk is filled up with zero rows that carry no loss.

    The head's matmuls thus see one of 16 shapes however many targets a micro-batch has. On a CPU every new
    matmul shape makes oneDNN build and cache a kernel with its own buffers (about 1.5 MB for this head), so
    shapes that followed the target count grew memory step after step; the fill costs under 16 rows a chunk.
    """
    chunks = max(1, math.ceil(count / LOGIT_CHUNK))
    return max(CHUNK_ROWS_STEP, math.ceil(count / chunks / CHUNK_ROWS_STEP) * CHUNK_ROWS_STEP)


def padded_loss(model, batch: dict) -> torch.Tensor:
    """The standard computation: full-vocabulary logits at every position, cross-entropy where targets exist."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # [micro_batch, width, vocab] -> one row per position; fp32 for a stable log-softmax under bf16 autocast
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def response_only_loss(model, batch: dict) -> torch.Tensor:
    """The LM head and cross-entropy only where a target exists (the response, unless train_on_inputs).

    The decoder runs on every token (the prompt is context), but the [tokens x vocab] logits, the
    largest tensor of a step with a 32K vocabulary, are made only for target positions, a chunk at a
    time, and never kept for backward (see HeadCrossEntropy). Same loss and gradients as padded_loss.
    """
    causal_lm = model.get_base_model()  # peft wrapper -> e.g. LlamaForCausalLM
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                      position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    has_target = batch["targets"] != IGNORE_INDEX
    hidden, targets = hidden[has_target], batch["targets"][has_target]  # [targets, hidden], [targets]
    head = causal_lm.get_output_embeddings()
    if type(head) is torch.nn.Linear and not head.weight.requires_grad and head.bias is None:
        return HeadCrossEntropy.apply(hidden, head.weight, targets)
    # a trainable or adapted head (e.g. LoRA on lm_head): the same chunks through autograd, recomputed in backward
    rows = head_chunk_rows(len(targets))
    fill = -len(targets) % rows  # zero rows with no target, so that every chunk has the same shape
    hidden, targets = F.pad(hidden, (0, 0, 0, fill)), F.pad(targets, (0, fill), value=IGNORE_INDEX)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), rows):
        chunk = slice(start, start + rows)
        total = total + checkpoint(
            lambda h, t: F.cross_entropy(head(h).float(), t, ignore_index=IGNORE_INDEX, reduction="sum"),
            hidden[chunk], targets[chunk], use_reentrant=False)
    return total


class HeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) for a frozen head, chunk by chunk.

    Forward computes each chunk's logits, its loss, and at once its gradient with respect to `hidden`
    (softmax - one_hot) @ weight, then drops the logits: backward only scales the saved [targets, hidden]
    gradient. That is the forward matmul plus one gradient matmul per target, the minimum, and no
    [targets x vocab] tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        # under autocast the matmuls run in the autocast dtype, like the nn.Linear they replace
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        weight_c = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=dtype)
        count, rows = len(targets), head_chunk_rows(len(targets))
        for start in range(0, count, rows):
            real = min(rows, count - start)  # the last chunk is filled up to `rows` with zero rows
            chunk_hidden = F.pad(hidden[start:start + real].to(dtype), (0, 0, 0, rows - real))
            chunk_targets = targets[start:start + real]
            log_probabilities = torch.log_softmax(chunk_hidden @ weight_c.T, dim=-1, dtype=torch.float32)
            total -= log_probabilities[:real].gather(1, chunk_targets[:, None]).sum()  # [rows, vocab] -> the loss
            if not ctx.needs_input_grad[0]:  # evaluation: the loss is all that is wanted
                continue
            probabilities = log_probabilities.exp_()  # in place: d loss / d logits = softmax - one_hot
            probabilities[torch.arange(real, device=hidden.device), chunk_targets] -= 1
            probabilities[real:] = 0  # the fill rows have no loss
            grad_hidden[start:start + real] = (probabilities.to(dtype) @ weight_c)[:real]
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_total).to(ctx.hidden_dtype), None, None


class LossModule(torch.nn.Module):
    """model + loss as one module, so DDP wraps the whole forward (its gradient hooks need the forward to run
    through it, and response_only_loss calls the decoder and head itself)."""

    def __init__(self, model, loss_sum):
        super().__init__()
        self.model, self.loss_sum = model, loss_sum

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_sum(self.model, batch)


@dataclass
class TrainResult:
    model: object  # the peft model as trained, adapter attached
    summary: dict  # also written to output_dir/training_summary.json
    history: list[dict]  # one record per optimizer step of this run, as in train_log.jsonl


def train(config: TrainConfig, loss_sum=response_only_loss) -> TrainResult:
    """Fine-tune and save the adapter folder. `loss_sum` is replaceable (the benchmark passes padded_loss)."""
    from accelerate import Accelerator

    started = time.time()
    config = config.validated()
    # One process, or DDP under torchrun / accelerate launch. Without a GPU accelerate runs DDP (gloo)
    # only when told it is on the CPU; a lone process keeps its default device (MPS included).
    launched = "LOCAL_RANK" in os.environ
    accelerator = Accelerator(cpu=launched and not torch.cuda.is_available())
    world_size, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    say = print if is_main else (lambda *args, **kwargs: None)
    if config.batch_size % (config.micro_batch_size * world_size):
        raise ValueError(f"--batch_size {config.batch_size} is not divisible by --micro_batch_size "
                         f"{config.micro_batch_size} x {world_size} processes; adjust one of them")
    accumulation = config.batch_size // (config.micro_batch_size * world_size)
    output_dir = _prepare_output_dir(config.output_dir) if is_main else Path(config.output_dir)
    resume = _resume_source(config.resume_from_checkpoint)

    # ---- data: rows -> train/validation examples ----
    template = load_template(config.prompt_template_name)
    tokenizer = load_tokenizer(config.base_model)  # first: a wrong --base_model fails before any data is read
    loaded = load_rows(config.data_path)
    rows, num_bad = validate_rows(loaded, config.skip_bad_rows)
    train_rows, val_rows = split_rows(rows, config.val_set_size, config.seed)
    train_set, val_set = (tokenize_rows_cached(part, tokenizer, template, config.cutoff_len, config.train_on_inputs,
                                               config.tokenized_cache_dir) for part in (train_rows, val_rows))
    if train_set.num_fitting == 0:
        raise ValueError(f"--cutoff_len {config.cutoff_len}: no training example fits (prompt + response + EOS); "
                         "raise --cutoff_len")
    examples = train_set.examples
    lengths = [len(e.input_ids) for e in examples]
    micro_batches_per_epoch = math.ceil(len(examples) / config.micro_batch_size)
    steps_per_epoch = micro_batches_per_epoch // (accumulation * world_size)  # an incomplete last step is dropped
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size {config.batch_size}: the {len(examples)} training examples fill no full batch; "
                         "lower --batch_size or add data")
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    say(f"data: {len(loaded.rows)} rows in {loaded.source} ({num_bad} bad dropped), {len(train_rows)} train, "
        f"{len(val_rows)} validation; {train_set.num_truncated} training examples truncated at cutoff_len "
        f"{config.cutoff_len}, {train_set.num_without_targets} dropped (prompt alone fills it)")
    say(f"steps: {total_steps} of {config.batch_size} examples ({steps_per_epoch} per epoch; "
        f"{accumulation} micro-batches of {config.micro_batch_size} x {world_size} processes)")

    # ---- model: base (+ quantization) + LoRA ----
    device = accelerator.device
    bf16 = fast_bf16_available(device) if config.bf16 is None else config.bf16
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--bf16 True: this GPU has no bf16 support; leave --bf16 out")
    quantization = "4bit" if config.load_4bit else "8bit" if _wants_8bit(config, device) else None
    # a quantized base is chosen to save memory: recompute activations too, as peft's kbit preparation does
    checkpointing = quantization is not None if config.gradient_checkpointing is None else config.gradient_checkpointing
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # the same LoRA init and dropout masks on every run with this seed
    model = load_model(config.base_model, quantization, bf16, device, attention_implementation(device, bf16))
    attention = model.config._attn_implementation  # what transformers set up; evaluate_loss reads it there too
    model = attach_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        target_modules=config.lora_target_modules, use_dora=config.use_dora,
                        use_rslora=config.use_rslora, gradient_checkpointing=checkpointing,
                        quantization=quantization)
    if config.fast_lora_dropout:  # DoRA's forward is left to see the input in the dtype peft gives it
        use_fast_lora_dropout(model, keep_input_dtype=bf16 and not config.use_dora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    gpu_memory_mb = {}
    if device.type == "cuda":  # what loading took; the peak is reset so that training's own peak is measured
        gpu_memory_mb = {"after_loading": torch.cuda.memory_allocated(device) / 2 ** 20,
                         "peak_while_loading": torch.cuda.max_memory_allocated(device) / 2 ** 20}
        torch.cuda.reset_peak_memory_stats(device)
    say(f"model: {config.base_model} ({quantization or ('bf16' if bf16 else 'fp32')} weights, "
        f"{'bf16 autocast' if bf16 else 'fp32'} on {device}, {attention} attention"
        f"{', gradient checkpointing' if checkpointing else ''}); "
        f"LoRA r={config.lora_r} on "
        f"{config.lora_target_modules}: {sum(p.numel() for p in trainable):,} trainable parameters")

    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = _lr_schedule(optimizer, config, total_steps)
    if config.torch_compile:
        model.get_base_model().get_decoder().compile(dynamic=True)
    loss_module = LossModule(model, loss_sum)
    ddp_loss = accelerator.prepare_model(loss_module)  # DDP wrapper when several processes, else the module itself
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    start_step = 0
    if resume and resume["kind"] == "checkpoint":
        start_step = _load_checkpoint(resume["path"], model, optimizer, scheduler, rank, config, loaded.sha256)
        say(f"resumed from {resume['path']} at step {start_step}")
    elif resume:
        _load_adapter_weights(model, resume["path"])
        say(f"starting from the adapter weights in {resume['path']}")
    if is_main:
        _truncate_log(output_dir / LOG_FILE, start_step)
    wandb_run = _start_wandb(config, model) if is_main and config.wandb_project else None

    # ---- the loop ----
    def step_micro_batches(step: int) -> list[list[list[int]]]:
        """This process's micro-batches for one optimizer step, each a list of rows of example indices
        (one example per row unless packing); the plan is the same on every process."""
        epoch, index = divmod(step, steps_per_epoch)
        plan = plan_micro_batches(lengths, config.micro_batch_size, config.seed, epoch, config.group_by_length,
                                  accumulation * world_size)
        window = plan[index * accumulation * world_size:(index + 1) * accumulation * world_size]
        mine = window[rank * accumulation:(rank + 1) * accumulation]
        return _layout(mine, lengths, config, attention)

    model.train()
    progress = _progress_bar(total_steps, start_step, is_main)
    # real tokens: not padding, all processes; computed tokens: what the model ran on, padding included
    history, val_loss, real_tokens, computed_tokens, train_seconds = [], None, 0, 0, 0.0
    for step in range(start_step, total_steps):
        step_started = time.time()
        micro_batches = step_micro_batches(step)
        batches = [_collate(mb, examples, tokenizer.pad_token_id, config) for mb in micro_batches]
        # The step's loss is sum(token losses) / (target tokens in the global batch). DDP averages the
        # gradients over processes, so each process scales its sum by world_size / global count.
        num_targets = accelerator.reduce(
            torch.tensor(sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches), device=device), "sum")
        step_tokens = sum(lengths[i] for mb in micro_batches for row in mb for i in row)
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            syncing = i == len(batches) - 1  # DDP all-reduces gradients on the last micro-batch only
            with nullcontext() if syncing else accelerator.no_sync(ddp_loss), autocast:
                token_loss_sum = ddp_loss(batch)
            accelerator.backward(token_loss_sum * world_size / num_targets)
            step_loss += token_loss_sum.detach()
            del token_loss_sum  # drops the graph now, not after the next forward (bitsandbytes keeps inputs on it)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_computed = sum(b["input_ids"].numel() for b in batches)
        totals = accelerator.reduce(torch.tensor([step_loss.item(), step_tokens, step_computed], device=device,
                                                 dtype=torch.float32), "sum")
        loss = totals[0].item() / num_targets.item()
        real_tokens, computed_tokens = real_tokens + int(totals[1]), computed_tokens + int(totals[2])
        step_seconds = time.time() - step_started
        train_seconds += step_seconds
        done = step + 1
        record = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": loss,
                  "learning_rate": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "target_tokens": int(num_targets), "real_tokens": int(totals[1]), "seconds": round(step_seconds, 4)}
        if val_set.examples and (done % config.eval_steps == 0 or done == total_steps):
            val_loss = evaluate_loss(loss_module, val_set.examples, config, tokenizer.pad_token_id, accelerator,
                                     autocast)
            record["val_loss"] = val_loss
        history.append(record)
        if is_main:
            with open(output_dir / LOG_FILE, "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if done % config.logging_steps == 0 or "val_loss" in record or done == total_steps:
                progress.write(_format_record(record, real_tokens / max(train_seconds, 1e-9)))
                if wandb_run:
                    wandb_run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=done)
        if done % config.save_steps == 0 and done < total_steps:
            _save_checkpoint(output_dir / f"{CHECKPOINT_PREFIX}{done}", model, optimizer, scheduler, done,
                             rank, is_main, config, loaded.sha256, accelerator)
    progress.close()
    if device.type == "cuda":
        gpu_memory_mb["peak_while_training"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        gpu_memory_mb["peak_reserved"] = torch.cuda.max_memory_reserved(device) / 2 ** 20

    # ---- the adapter folder ----
    summary = {
        "base_model": config.base_model,
        "prompt_template": template.to_dict(),
        "arguments": {**dataclasses.asdict(config), "world_size": world_size},
        "data": {"path": loaded.source, "sha256": loaded.sha256, "rows": len(loaded.rows), "bad_rows_dropped": num_bad,
                 "train_rows": len(train_rows), "validation_rows": len(val_rows),
                 "truncated_examples": train_set.num_truncated,
                 "examples_without_targets": train_set.num_without_targets,
                 "validation_file": VALIDATION_FILE if val_rows else None},
        "precision": quantization or ("bf16" if bf16 else "fp32"),
        "gradient_checkpointing": checkpointing,
        "attention": attention,
        "gpu_memory_mb": gpu_memory_mb or None,  # allocated by PyTorch on this process's GPU
        "device": str(device),
        "steps": total_steps,
        "final_train_loss": history[-1]["loss"] if history else None,
        "final_validation_loss": val_loss,
        "real_tokens_per_second": real_tokens / train_seconds if train_seconds else None,
        "padding_fraction": 1 - real_tokens / computed_tokens if computed_tokens else None,
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - started,
        "versions": _versions(),
    }
    if is_main:
        _save_adapter(output_dir, model, tokenizer, summary, val_rows)
        if wandb_run:
            _finish_wandb(wandb_run, config, output_dir)
        say(f"saved the adapter to {output_dir}")
    accelerator.wait_for_everyone()
    return TrainResult(model=model, summary=summary, history=history)


def evaluate_loss(loss_module, examples, config: TrainConfig, pad_token_id, accelerator, autocast) -> float:
    """Mean loss per target token over `examples`, split over the processes; dropout off while it runs."""
    loss_module.eval()
    lengths = [len(e.input_ids) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])  # similar lengths: less padding
    micro_batches = _layout([order[i:i + config.micro_batch_size] for i in range(0, len(order), config.micro_batch_size)],
                            lengths, config, loss_module.model.config._attn_implementation)
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    with torch.no_grad(), autocast:
        for mb in micro_batches[accelerator.process_index::accelerator.num_processes]:
            batch = {k: v.to(accelerator.device) for k, v in _collate(mb, examples, pad_token_id, config).items()}
            total += loss_module(batch).float()
            count += (batch["targets"] != IGNORE_INDEX).sum()
    loss_module.train()
    return (accelerator.reduce(total, "sum") / accelerator.reduce(count, "sum")).item()


def _layout(micro_batches: list[list[int]], lengths: list[int], config: TrainConfig,
            attention: str) -> list[list[list[int]]]:
    """Padded: each micro-batch as planned, one example per row. Packed: the same examples laid into as few
    rows of cutoff_len tokens as possible, micro_batch_size rows per micro-batch. With a variable-length
    attention kernel, whose cost is per example whatever the row, those rows go end to end in one row: no filler."""
    if not config.packing:
        return [[[i] for i in mb] for mb in micro_batches]
    rows = pack_rows([i for mb in micro_batches for i in mb], lengths, config.cutoff_len)
    packed = [rows[start:start + config.micro_batch_size] for start in range(0, len(rows), config.micro_batch_size)]
    if attention in VARLEN_ATTENTION:
        return [[[i for row in group for i in row]] for group in packed]
    return packed


def _collate(micro_batch: list[list[int]], examples, pad_token_id: int, config: TrainConfig) -> dict:
    if config.packing:
        return packed_collate([[examples[i] for i in row] for row in micro_batch], pad_token_id)
    return pad_collate([examples[i] for [i] in micro_batch], pad_token_id)


def _wants_8bit(config: TrainConfig, device: torch.device) -> bool:
    if config.load_8bit is None:  # alpaca-lora's default on a GPU; on a CPU 8-bit only costs speed
        return device.type == "cuda" and not config.load_4bit
    return config.load_8bit


def _lr_schedule(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


def _prepare_output_dir(output_dir: str) -> Path:
    """Create output_dir and prove it is writable before any work is done."""
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--output_dir {output_dir}: not writable ({error.strerror or error}); "
                         "choose a folder you can write to") from None
    return path


def _resume_source(resume_from_checkpoint: str) -> dict | None:
    if not resume_from_checkpoint:
        return None
    path = Path(resume_from_checkpoint).expanduser()
    if (path / "trainer_state.json").is_file():
        return {"kind": "checkpoint", "path": path}
    if (path / "adapter_model.safetensors").is_file():
        return {"kind": "adapter", "path": path}
    raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: neither a checkpoint folder "
                     f"(trainer_state.json) nor an adapter folder (adapter_model.safetensors)")


# ---- checkpoints: adapter weights, optimizer, schedule, RNG of every process, step ----

_RESUME_MUST_MATCH = ("base_model", "batch_size", "micro_batch_size", "cutoff_len", "val_set_size", "seed",
                      "train_on_inputs", "group_by_length", "prompt_template_name", "lora_r", "num_epochs")


def _save_checkpoint(path: Path, model, optimizer, scheduler, step, rank, is_main, config, data_sha256, accelerator):
    accelerator.wait_for_everyone()
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
        torch.save(scheduler.state_dict(), path / "scheduler.pt")
    accelerator.wait_for_everyone()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path / f"rng_state_{rank}.pt")
    accelerator.wait_for_everyone()
    if is_main:  # written last: a checkpoint without it is incomplete and is not resumed from
        state = {"step": step, "data_sha256": data_sha256, "arguments": dataclasses.asdict(config)}
        (path / "trainer_state.json").write_text(json.dumps(state, indent=2))
        checkpoints = sorted(path.parent.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in checkpoints[:-config.save_total_limit]:
            shutil.rmtree(old)


def _load_checkpoint(path: Path, model, optimizer, scheduler, rank, config: TrainConfig, data_sha256: str) -> int:
    state = json.loads((path / "trainer_state.json").read_text())
    saved = state["arguments"]
    changed = [f"{k} ({saved.get(k)!r} -> {getattr(config, k)!r})" for k in _RESUME_MUST_MATCH
               if saved.get(k) != getattr(config, k)]
    if state["data_sha256"] != data_sha256:
        changed.append("data_path contents")
    if changed:
        raise ValueError(f"--resume_from_checkpoint {path}: the run was started with other settings: "
                         f"{', '.join(changed)}; resume with the same flags")
    _load_adapter_weights(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_state_{rank}.pt"
    if not rng_file.is_file():
        raise ValueError(f"--resume_from_checkpoint {path}: no {rng_file.name}; resume with as many processes as saved it")
    rng = torch.load(rng_file, weights_only=False)  # our own file: Python's RNG state is a plain tuple
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


def _load_adapter_weights(model, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"--resume_from_checkpoint {path}: the adapter does not match this model and LoRA settings "
                         f"(missing {missing[0]}); use the flags it was trained with")


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Keep the log's records up to the step training starts from (a fresh run keeps none)."""
    if not log_path.is_file():
        return
    kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    log_path.write_text("".join(line + "\n" for line in kept))


def _save_adapter(output_dir: Path, model, tokenizer, summary: dict, val_rows: list[dict]) -> None:
    """peft's own save (safetensors), the tokenizer, the summary and a model card; the weights go last,
    so a folder interrupted while saving has no adapter_model.safetensors and does not look finished."""
    staging = output_dir / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(output_dir)
    if val_rows:
        (output_dir / VALIDATION_FILE).write_text(json.dumps(val_rows, indent=1, ensure_ascii=False))
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    (output_dir / "README.md").write_text(model_card(summary))
    (staging / "adapter_config.json").replace(output_dir / "adapter_config.json")
    (staging / "adapter_model.safetensors").replace(output_dir / "adapter_model.safetensors")
    shutil.rmtree(staging, ignore_errors=True)


def model_card(summary: dict) -> str:
    """The README.md of an adapter folder: what it is, how it was made, and what it must not be used for."""
    args, data = summary["arguments"], summary["data"]
    val = summary["final_validation_loss"]
    gpu = summary.get("gpu_memory_mb")
    memory = f" (peak GPU memory {max(gpu['peak_while_loading'], gpu['peak_while_training']) / 1024:.1f} GB)" if gpu else ""
    flags = "\n".join(f"| `{k}` | `{v}` |" for k, v in args.items())
    return f"""---
library_name: peft
base_model: {summary['base_model']}
tags: [alpaca, lora, instruction-tuning, alpaca-lora]
license: other
---

# LoRA adapter for {summary['base_model']}

An instruction-following LoRA adapter trained with alpaca-lora on Alpaca-format data, prompt template
`{summary['prompt_template']['name']}`. Load it with `peft.PeftModel.from_pretrained(base, this_folder)`, or
`python generate.py --lora_weights this_folder`.

## Data
- source: `{data['path']}` (sha256 `{data['sha256']}`)
- {data['rows']} rows, {data['bad_rows_dropped']} bad rows dropped; {data['train_rows']} trained on, {data['validation_rows']} held out
  for validation{' (`' + data['validation_file'] + '`)' if data['validation_file'] else ''}
- {data['truncated_examples']} training examples were cut at cutoff_len {args['cutoff_len']} (no EOS learned for them)

## Evaluation
- final training loss (last step): {summary['final_train_loss']:.4f}
- validation loss (per response token): {f'{val:.4f} (perplexity {math.exp(val):.2f})' if val is not None else 'not measured (val_set_size 0)'}
- {summary['steps']} optimizer steps, {summary['precision']} on {summary['device']} ({summary['attention']} attention){memory}, {summary['wall_seconds']:.0f} s

## Training arguments
| flag | value |
| --- | --- |
{flags}

## Licences
The base model's weights keep their own licence, which also governs this adapter's use with them. The
Stanford Alpaca data is CC BY-NC 4.0 (non-commercial); data generated through the OpenAI API is also
subject to its terms of use. Check the licence of whatever data you trained on: it follows the adapter.

## Limitations
For research. Models like this hallucinate facts, follow harmful instructions, and reproduce the biases
of their base model and of the generated training data. They have not been evaluated for safety.
"""


def _format_record(record: dict, tokens_per_second: float) -> str:
    text = (f"step {record['step']} | loss {record['loss']:.4f} | lr {record['learning_rate']:.2e} | "
            f"grad norm {record['grad_norm']:.3f} | {tokens_per_second:.0f} tokens/s")
    return text + (f" | val loss {record['val_loss']:.4f}" if "val_loss" in record else "")


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs keep the per-step lines instead)
    return tqdm(total=total, initial=initial, disable=None if enabled else True, desc="training", dynamic_ncols=True,
                file=sys.stderr)


def _start_wandb(config: TrainConfig, model):
    import wandb

    run = wandb.init(project=config.wandb_project, name=config.wandb_run_name or None,
                     config=dataclasses.asdict(config))
    if config.wandb_watch in ("gradients", "parameters", "all"):
        run.watch(model, log=config.wandb_watch, log_freq=config.logging_steps)
    return run


def _finish_wandb(run, config: TrainConfig, output_dir: Path) -> None:
    if config.wandb_log_model in ("true", "end", "checkpoint"):
        import wandb

        artifact = wandb.Artifact(f"adapter-{run.id}", type="model")
        for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", SUMMARY_FILE):
            artifact.add_file(str(output_dir / name))
        run.log_artifact(artifact)
    run.finish()


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
