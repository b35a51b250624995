"""Progress: what a run reports after each optimizer step: a line in train_log.jsonl, the terminal, and W&B.

The log holds one JSON record per step ({step, epoch, loss, learning_rate, grad_norm, target_tokens,
real_tokens, seconds} and val_loss where validation ran); a resumed run first cuts it back to the step it
resumes from, so the log reads as one run.
"""

import json
import sys
from pathlib import Path

from .files import append_jsonl, resume_jsonl, write_text_atomically

LOG_FILE = "train_log.jsonl"


class ProgressReport:
    """Only the main process reports; the others make a report with enabled=False that does nothing."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, logging_steps: int, enabled: bool,
                 wandb_run=None):
        from tqdm.auto import tqdm

        self.log_path, self.logging_steps, self.total_steps = output_dir / LOG_FILE, logging_steps, total_steps
        self.enabled, self.wandb_run = enabled, wandb_run
        if enabled:
            kept = [record for record in resume_jsonl(self.log_path) if record["step"] <= start_step]
            write_text_atomically(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))
        # disable=None: no bar when stderr is not a terminal (logs keep the per-step lines instead)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=None if enabled else True, desc="training",
                        dynamic_ncols=True, file=sys.stderr)

    def step(self, record: dict, tokens_per_second: float) -> None:
        if not self.enabled:
            return
        append_jsonl(self.log_path, [record])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        done = record["step"]
        if done % self.logging_steps == 0 or "val_loss" in record or done == self.total_steps:
            self.bar.write(format_record(record, tokens_per_second))
            if self.wandb_run:
                self.wandb_run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=done)

    def close(self) -> None:
        self.bar.close()


def format_record(record: dict, tokens_per_second: float) -> str:
    text = (f"step {record['step']} | loss {record['loss']:.4f} | lr {record['learning_rate']:.2e} | "
            f"grad norm {record['grad_norm']:.3f} | {tokens_per_second:.0f} tokens/s")
    return text + (f" | val loss {record['val_loss']:.4f}" if "val_loss" in record else "")


def start_wandb(project: str, run_name: str, watch: str, arguments: dict, model, log_freq: int):
    import wandb

    run = wandb.init(project=project, name=run_name or None, config=arguments)
    if watch in ("gradients", "parameters", "all"):
        run.watch(model, log=watch, log_freq=log_freq)
    return run


def finish_wandb(run, log_model: str, files: list[Path]) -> None:
    """Upload `files` (the adapter) as a model artifact if --wandb_log_model asks for it, and end the run."""
    if log_model in ("true", "end", "checkpoint"):
        import wandb

        artifact = wandb.Artifact(f"adapter-{run.id}", type="model")
        for path in files:
            artifact.add_file(str(path))
        run.log_artifact(artifact)
    run.finish()
