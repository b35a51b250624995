"""Train: fine-tune a LoRA adapter on Alpaca rows. The recipe, read top to bottom:

    rows -> examples (data.py) -> groups of examples, passes of rows (batching.py) -> summed token loss (loss.py)
         -> one AdamW step per batch_size examples (train_step) -> validation every eval_steps (evaluation.py),
            checkpoints every save_steps (checkpoints.py) -> the adapter folder (adapter_folder.py)

One optimizer step sees `batch_size` examples: `accumulation` groups of `micro_batch_size` on each of
`world_size` processes. The step's loss is the mean over every target token of the whole global batch (not a
mean of per-pass means), so the same examples give the same loss and gradients whether they are split over
1 process or many, padded or packed.
"""

import dataclasses
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter_folder import (PUBLISHED_FILES, VALIDATION_FILE, DataSummary, TrainingSummary, claim_output_dir,
                             save_adapter)
from .batching import PassLayout, StepPlan, collate, passes
from .checkpoints import PREFIX, load_adapter_weights, load_checkpoint, resume_source, save_adapter_only, save_checkpoint
from .config import TrainConfig
from .chat_template import ChatTemplate, chat_template_for, end_of_turn_ids
from .cpu_attention import use_cpu_sdpa
from .data import (IGNORE_INDEX, LoadedRows, TokenizedSet, duplicate_rows, is_conversation, load_rows, rendering_problem,
                   split_rows, validate_rows)
from .evaluation import evaluate_loss
from .gated_mlp import use_lean_gated_mlp
from .loss import LossModule, response_only_loss
from .model import (VARLEN_ATTENTION, attach_lora, attention_implementation, check_base_model, fast_bf16_available,
                    load_model, load_tokenizer, set_pad_token, use_fast_lora_dropout)
from .progress import ProgressReport, finish_wandb, start_wandb
from .rms_norm import use_lean_rms_norm
from .templates import load_template
from .tokenized_cache import tokenize_rows_cached


@dataclass
class TrainResult:
    model: object  # the peft model as trained, adapter attached
    summary: TrainingSummary  # also written to output_dir/training_summary.json
    history: list[dict]  # one record per optimizer step of this run, as in train_log.jsonl


def train(config: TrainConfig, loss_sum=response_only_loss) -> TrainResult:
    """Fine-tune and save the adapter folder. `loss_sum` is replaceable (the benchmark passes padded_loss)."""
    started = time.time()
    config = config.validated()
    accelerator = _accelerator()
    world_size, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    say = print if is_main else (lambda *args, **kwargs: None)
    if config.batch_size % (config.micro_batch_size * world_size):
        raise ValueError(f"--batch_size {config.batch_size} is not divisible by --micro_batch_size "
                         f"{config.micro_batch_size} x {world_size} processes; adjust one of them")
    resume = resume_source(config.resume_from_checkpoint)
    output_dir, lock = (claim_output_dir(config.output_dir, config.overwrite_output_dir, resume and resume[1])
                        if is_main else (Path(config.output_dir).expanduser(), None))

    # ---- data: rows -> training and validation examples -> the plan of every step ----
    data = load_training_data(config)
    examples = data.train_set.examples
    plan = StepPlan(lengths=[len(e.input_ids) for e in examples], examples_per_group=config.micro_batch_size,
                    accumulation=config.batch_size // (config.micro_batch_size * world_size), world_size=world_size,
                    seed=config.seed, group_by_length=config.group_by_length)
    total_steps = _total_steps(plan, config)
    say(data.describe(config.cutoff_len))
    say(_describe_steps(plan, total_steps, config))

    # ---- model: base (+ quantization) + LoRA, AdamW and its schedule ----
    loaded = load_training_model(config, accelerator.device)
    say(loaded.describe(config, accelerator.device))
    model = loaded.model
    layout = PassLayout(rows_per_pass=config.micro_batch_size, row_length=config.cutoff_len, packing=config.packing,
                        one_row=loaded.attention in VARLEN_ATTENTION)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay))
    scheduler = accelerator.prepare_scheduler(_lr_schedule(optimizer.optimizer, config, total_steps))
    loss_module = LossModule(model, loss_sum)
    ddp_loss = accelerator.prepare_model(loss_module)  # DDP wrapper when several processes, else the module itself
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16) if loaded.bf16 else nullcontext()
    save_adapter_only(accelerator)
    start_step = _resume(resume, model, accelerator, config, data.loaded.sha256, say)
    wandb_run = (start_wandb(config.wandb_project, config.wandb_run_name, config.wandb_watch,
                             dataclasses.asdict(config), model, config.logging_steps)
                 if is_main and config.wandb_project else None)

    # ---- the loop ----
    model.train()
    report = ProgressReport(output_dir, total_steps, start_step, config.logging_steps, is_main, wandb_run)
    history, val_loss, real_tokens, computed_tokens, train_seconds = [], None, 0, 0, 0.0
    for step in range(start_step, total_steps):
        step_started = time.time()
        my_passes = passes(plan.groups(step, rank), plan.lengths, layout)
        batches = [collate(one_pass, examples, data.tokenizer.pad_token_id, layout) for one_pass in my_passes]
        mine = sum(plan.lengths[i] for one_pass in my_passes for row in one_pass for i in row)
        result = train_step(ddp_loss, batches, mine, optimizer, scheduler, trainable, config.max_grad_norm,
                            accelerator, autocast)
        real_tokens, computed_tokens = real_tokens + result["real_tokens"], computed_tokens + result["computed_tokens"]
        step_seconds = time.time() - step_started
        train_seconds += step_seconds
        done = step + 1
        record = {"step": done, "epoch": round(done / plan.steps_per_epoch, 4), "loss": result["loss"],
                  "learning_rate": scheduler.get_last_lr()[0], "grad_norm": result["grad_norm"],
                  "target_tokens": result["target_tokens"], "real_tokens": result["real_tokens"],
                  "seconds": round(step_seconds, 4)}
        if data.val_set.examples and (done % config.eval_steps == 0 or done == total_steps):
            val_loss = record["val_loss"] = evaluate_loss(loss_module, data.val_set.examples, layout,
                                                          data.tokenizer.pad_token_id, accelerator, autocast)
        history.append(record)
        report.step(record, real_tokens / max(train_seconds, 1e-9))
        if done % config.save_steps == 0 and done < total_steps:
            save_checkpoint(output_dir / f"{PREFIX}{done}", model, accelerator, done, dataclasses.asdict(config),
                            data.loaded.sha256, config.save_total_limit)
    report.close()

    # ---- the adapter folder ----
    summary = _summary(config, world_size, data, loaded, accelerator.device, total_steps, history, val_loss,
                       real_tokens, computed_tokens, train_seconds, started)
    if is_main:
        stop_token_ids = (end_of_turn_ids(data.template, data.tokenizer) if isinstance(data.template, ChatTemplate)
                          else [data.tokenizer.eos_token_id])
        save_adapter(output_dir, model, data.tokenizer, summary, data.val_rows, stop_token_ids)
        if wandb_run:
            finish_wandb(wandb_run, config.wandb_log_model, [output_dir / name for name in PUBLISHED_FILES])
        say(f"saved the adapter to {output_dir}")
    accelerator.wait_for_everyone()
    if lock:
        lock.close()
    return TrainResult(model=model, summary=summary, history=history)


def train_step(ddp_loss, batches: list[dict], real_tokens: int, optimizer, scheduler, trainable: list,
               max_grad_norm: float, accelerator, autocast) -> dict:
    """One optimizer step on this process's passes: forward and backward each, gradients all-reduced with the
    last one only, clipped, then AdamW and the schedule. Returns the step's numbers summed over all processes.

    The loss is sum(token losses) / (target tokens in the global batch). DDP averages the gradients over the
    processes, so each process scales its sum by world_size / global count; the sum itself is what the
    loss function returns (loss.py).
    """
    device, world_size = accelerator.device, accelerator.num_processes
    num_targets = accelerator.reduce(
        torch.tensor(sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches), device=device), "sum")
    step_loss = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        syncing = i == len(batches) - 1  # DDP all-reduces gradients on the last pass only
        with nullcontext() if syncing else accelerator.no_sync(ddp_loss), autocast:
            token_loss_sum = ddp_loss(batch)
        accelerator.backward(token_loss_sum * world_size / num_targets)
        step_loss += token_loss_sum.detach()
        del token_loss_sum  # drops the graph now, not after the next forward (bitsandbytes keeps inputs on it)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    computed = sum(b["input_ids"].numel() for b in batches)  # padding included
    totals = accelerator.reduce(torch.tensor([step_loss.item(), real_tokens, computed], device=device,
                                             dtype=torch.float32), "sum")
    return {"loss": totals[0].item() / num_targets.item(), "grad_norm": float(grad_norm),
            "target_tokens": int(num_targets), "real_tokens": int(totals[1]), "computed_tokens": int(totals[2])}


@dataclass
class TrainingData:
    tokenizer: object
    template: object  # a ChatTemplate, or the PromptTemplate of Alpaca rows trained without one
    loaded: LoadedRows
    num_bad: int
    num_duplicates: int  # rows that repeat an earlier row exactly; split_rows keeps each one's copies together
    train_rows: list[dict]
    val_rows: list[dict]
    train_set: TokenizedSet
    val_set: TokenizedSet

    def describe(self, cutoff_len: int) -> str:
        return (f"data: {len(self.loaded.rows)} rows in {self.loaded.source} ({self.num_bad} bad dropped, "
                f"{self.num_duplicates} repeating an earlier row), "
                f"{len(self.train_rows)} train, {len(self.val_rows)} validation; {self.train_set.num_truncated} "
                f"training examples truncated at cutoff_len {cutoff_len}, {self.train_set.num_without_targets} "
                "dropped (prompt alone fills it)")


def load_training_data(config: TrainConfig) -> TrainingData:
    """Rows -> validated -> split -> tokenized (cached) training and validation examples. The cheap checks come
    first: a missing model folder or a bad data file is reported before the tokenizer takes its seconds to load."""
    template = load_template(config.prompt_template_name)
    check_base_model(config.base_model)
    loaded = load_rows(config.data_path, skip_malformed_lines=config.skip_bad_rows)
    rows, num_bad = validate_rows(loaded, config.skip_bad_rows)
    tokenizer = load_tokenizer(config.base_model)
    chat_template = chat_template_for(config.chat_template, tokenizer, is_conversation(rows))
    if chat_template:  # every row rendered once more, so that a row the template refuses is named now
        set_pad_token(tokenizer, end_of_turn_ids(chat_template, tokenizer), config.base_model)
        rows, num_bad = validate_rows(loaded, config.skip_bad_rows, rendering_problem(chat_template, tokenizer))
        template = chat_template
    train_rows, val_rows = split_rows(rows, config.val_set_size, config.seed)
    train_set, val_set = (tokenize_rows_cached(part, tokenizer, template, config.cutoff_len, config.train_on_inputs,
                                               config.tokenized_cache_dir) for part in (train_rows, val_rows))
    if train_set.num_fitting == 0:
        raise ValueError(f"--cutoff_len {config.cutoff_len}: no training example fits whole (with its end-of-turn "
                         "token); raise --cutoff_len")
    return TrainingData(tokenizer, template, loaded, num_bad, duplicate_rows(rows), train_rows, val_rows, train_set,
                        val_set)


@dataclass
class TrainingModel:
    model: object  # the peft model
    quantization: str | None
    bf16: bool
    checkpointing: bool
    attention: str  # what transformers set up, read back from the loaded model
    gpu_memory_mb: dict  # what loading took on a GPU, else empty

    def describe(self, config: TrainConfig, device: torch.device) -> str:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (f"model: {config.base_model} ({self.quantization or ('bf16' if self.bf16 else 'fp32')} weights, "
                f"{'bf16 autocast' if self.bf16 else 'fp32'} on {device}, {self.attention} attention"
                f"{', gradient checkpointing' if self.checkpointing else ''}); LoRA r={config.lora_r} on "
                f"{_targets(self.model)}: {trainable:,} trainable parameters")


def _targets(model) -> str:
    targets = model.peft_config["default"].target_modules
    return ",".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else str(targets)


def load_training_model(config: TrainConfig, device: torch.device) -> TrainingModel:
    """The base on `device` (8-bit by default on a GPU, as alpaca-lora; bf16 where it is fast) with LoRA attached."""
    bf16 = fast_bf16_available(device) if config.bf16 is None else config.bf16
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--bf16 True: this GPU has no bf16 support; leave --bf16 out")
    wants_8bit = device.type == "cuda" and not config.load_4bit if config.load_8bit is None else config.load_8bit
    quantization = "4bit" if config.load_4bit else "8bit" if wants_8bit else None
    # a quantized base is chosen to save memory: recompute activations too, as peft's kbit preparation does
    checkpointing = quantization is not None if config.gradient_checkpointing is None else config.gradient_checkpointing
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # the same LoRA init and dropout masks on every run with this seed
    model = load_model(config.base_model, quantization, bf16, device, attention_implementation(device, bf16))
    model = attach_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        target_modules=config.lora_target_modules, use_dora=config.use_dora,
                        use_rslora=config.use_rslora, gradient_checkpointing=checkpointing, quantization=quantization)
    if config.fast_lora_dropout:  # DoRA's forward is left to see the input in the dtype peft gives it
        use_fast_lora_dropout(model, keep_input_dtype=bf16 and not config.use_dora)
    if config.lean_activations:
        use_lean_rms_norm(model)
        use_lean_gated_mlp(model)
        use_cpu_sdpa(model.get_base_model())
    attention = model.get_base_model().config._attn_implementation
    if config.torch_compile:
        model.get_base_model().get_decoder().compile(dynamic=True)
    gpu_memory_mb = {}
    if device.type == "cuda":  # what loading took; the peak is reset so that training's own peak is measured
        gpu_memory_mb = {"after_loading": torch.cuda.memory_allocated(device) / 2 ** 20,
                         "peak_while_loading": torch.cuda.max_memory_allocated(device) / 2 ** 20}
        torch.cuda.reset_peak_memory_stats(device)
    return TrainingModel(model, quantization, bf16, checkpointing, attention, gpu_memory_mb)


def _accelerator():
    from accelerate import Accelerator

    # One process, or DDP under torchrun / accelerate launch. Without a GPU accelerate runs DDP (gloo) only when
    # told it is on the CPU; a lone process keeps its default device (MPS included). The schedule steps once per
    # optimizer step (accelerate's default would step it once per process).
    launched = "LOCAL_RANK" in os.environ
    return Accelerator(cpu=launched and not torch.cuda.is_available(), step_scheduler_with_optimizer=False)


def _total_steps(plan: StepPlan, config: TrainConfig) -> int:
    if plan.steps_per_epoch == 0:
        raise ValueError(f"--batch_size {config.batch_size}: the {len(plan.lengths)} training examples fill no full "
                         "batch; lower --batch_size or add data")
    total = plan.steps_per_epoch * config.num_epochs
    return min(total, config.max_steps) if config.max_steps else total


def _describe_steps(plan: StepPlan, total_steps: int, config: TrainConfig) -> str:
    per_step = f"{plan.accumulation} x {config.micro_batch_size} examples per process per step"
    passes_of = (f"packed into rows of up to {config.cutoff_len} tokens, {config.micro_batch_size} rows a pass"
                 if config.packing else "one padded example per row")
    return (f"steps: {total_steps} optimizer steps of {config.batch_size} examples ({plan.steps_per_epoch} per "
            f"epoch; {per_step}, {passes_of})")


def _lr_schedule(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


def _resume(resume, model, accelerator, config: TrainConfig, data_sha256: str, say) -> int:
    """The step training starts from: a checkpoint's, or 0 (from an adapter's weights, or fresh)."""
    if resume is None:
        return 0
    kind, folder = resume
    if kind == "adapter":
        load_adapter_weights(model, folder)
        say(f"starting from the adapter weights in {folder}")
        return 0
    step = load_checkpoint(folder, model, accelerator, dataclasses.asdict(config), data_sha256)
    say(f"resumed from {folder} at step {step}")
    return step


def _summary(config: TrainConfig, world_size: int, data: TrainingData, loaded: TrainingModel, device, steps: int,
             history: list[dict], val_loss, real_tokens: int, computed_tokens: int, train_seconds: float,
             started: float) -> TrainingSummary:
    import peft
    import transformers

    gpu_memory_mb = dict(loaded.gpu_memory_mb)
    if device.type == "cuda":
        gpu_memory_mb["peak_while_training"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        gpu_memory_mb["peak_reserved"] = torch.cuda.max_memory_reserved(device) / 2 ** 20
    return TrainingSummary(
        base_model=config.base_model,
        prompt_template=None if isinstance(data.template, ChatTemplate) else data.template.to_dict(),
        chat_template=data.template.to_dict() if isinstance(data.template, ChatTemplate) else None,
        arguments={**dataclasses.asdict(config), "world_size": world_size},
        data=DataSummary(path=data.loaded.source, sha256=data.loaded.sha256, rows=len(data.loaded.rows),
                         bad_rows_dropped=data.num_bad, train_rows=len(data.train_rows),
                         validation_rows=len(data.val_rows), truncated_examples=data.train_set.num_truncated,
                         examples_without_targets=data.train_set.num_without_targets,
                         validation_file=VALIDATION_FILE if data.val_rows else None,
                         duplicate_rows=data.num_duplicates),
        precision=loaded.quantization or ("bf16" if loaded.bf16 else "fp32"),
        gradient_checkpointing=loaded.checkpointing, attention=loaded.attention, gpu_memory_mb=gpu_memory_mb or None,
        device=str(device), steps=steps, final_train_loss=history[-1]["loss"] if history else None,
        final_validation_loss=val_loss, real_tokens_per_second=real_tokens / train_seconds if train_seconds else None,
        padding_fraction=1 - real_tokens / computed_tokens if computed_tokens else None,
        train_seconds=train_seconds, wall_seconds=time.time() - started,
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__})
