"""Checkpoints: every save_steps, all that an exact resume needs, in output_dir/checkpoint-<step>.

    adapter_model.safetensors, adapter_config.json  the LoRA weights (peft's save; the frozen base is not saved)
    optimizer.bin, scheduler.bin                     AdamW's moments, the schedule's position  } accelerate's
    random_states_<rank>.pkl                         Python, NumPy and torch RNGs, each process } save_state
    trainer_state.json                               the step, the data's hash and the flags: written last, so
                                                     a folder without it is incomplete and never resumed from

accelerate's save_state and load_state write and read the optimizer, scheduler and RNG files (tensors and plain
values, loaded weights-only). A hook registered here keeps them from writing the model: that would be the
whole base, gigabytes per checkpoint, where the adapter is a few megabytes. The newest save_total_limit
checkpoints are kept; accelerate's own rotation (ProjectConfiguration(total_limit=...)) does not fit: it names
folders by save count rather than step, and deletes the oldest before the new one is written, so a kill
during a save would leave one complete checkpoint fewer.
"""

import json
import shutil
from pathlib import Path

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
# flags whose change would make the resumed run a different run (other examples, order, shapes or model)
MUST_MATCH = ("base_model", "batch_size", "micro_batch_size", "cutoff_len", "val_set_size", "seed", "train_on_inputs",
              "group_by_length", "prompt_template_name", "lora_r", "num_epochs")


def save_adapter_only(accelerator) -> None:
    """Make accelerate's save_state/load_state leave the model out (the adapter is saved and loaded by peft)."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def save_checkpoint(folder: Path, model, accelerator, step: int, arguments: dict, data_sha256: str, keep: int) -> None:
    """Write checkpoint `folder` from every process, then drop all but the newest `keep` beside it."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
    accelerator.save_state(folder)  # the main process writes the optimizer and scheduler, each process its RNGs
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "data_sha256": data_sha256, "arguments": arguments}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        checkpoints = sorted(folder.parent.glob(f"{PREFIX}*"), key=lambda p: int(p.name[len(PREFIX):]))
        for old in checkpoints[:-keep]:
            shutil.rmtree(old)


def load_checkpoint(folder: Path, model, accelerator, arguments: dict, data_sha256: str) -> int:
    """Restore the adapter, optimizer, schedule and RNGs from `folder`; returns the step it was saved at."""
    state = json.loads((folder / STATE_FILE).read_text())
    saved = state["arguments"]
    changed = [f"{k} ({saved.get(k)!r} -> {arguments[k]!r})" for k in MUST_MATCH if saved.get(k) != arguments[k]]
    if state["data_sha256"] != data_sha256:
        changed.append("data_path contents")
    if changed:
        raise ValueError(f"--resume_from_checkpoint {folder}: the run was started with other settings: "
                         f"{', '.join(changed)}; resume with the same flags")
    rng_file = folder / f"random_states_{accelerator.process_index}.pkl"
    if (folder / "optimizer.pt").is_file():
        raise ValueError(f"--resume_from_checkpoint {folder}: written by an earlier alpaca-lora (optimizer.pt, "
                         "rng_state_N.pt), whose checkpoints this version does not read; resume with that version")
    if not rng_file.is_file():  # accelerate would carry on without it, and the run would not be the same
        raise ValueError(f"--resume_from_checkpoint {folder}: no {rng_file.name}; resume with as many processes "
                         "as saved it")
    load_adapter_weights(model, folder)
    accelerator.load_state(folder)
    return state["step"]


def load_adapter_weights(model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"--resume_from_checkpoint {folder}: the adapter does not match this model and LoRA "
                         f"settings (missing {missing[0]}); use the flags it was trained with")


def resume_source(resume_from_checkpoint: str) -> tuple[str, Path] | None:
    """("checkpoint", folder) to resume exactly, ("adapter", folder) to start from an adapter's weights, or None."""
    if not resume_from_checkpoint:
        return None
    path = Path(resume_from_checkpoint).expanduser()
    if (path / STATE_FILE).is_file():
        return "checkpoint", path
    if (path / "adapter_model.safetensors").is_file():
        return "adapter", path
    raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: neither a checkpoint folder "
                     f"({STATE_FILE}) nor an adapter folder (adapter_model.safetensors)")
