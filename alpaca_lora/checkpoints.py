"""Checkpoints: every save_steps, all that an exact resume needs, in output_dir/checkpoint-<step>.

    adapter_model.safetensors, adapter_config.json  the LoRA weights (peft's save; the frozen base is not saved)
    optimizer.bin, scheduler.bin                     AdamW's moments, the schedule's position  } accelerate's
    random_states_<rank>.pkl                         Python, NumPy and torch RNGs, each process } save_state
    trainer_state.json                               the step, the data's hash and the flags

A checkpoint is written as .checkpoint-<step>.saving, flushed to disk, and renamed into place whole: a run killed
while saving leaves the previous checkpoints and a staging folder that is never taken for one.

accelerate's save_state and load_state write and read the optimizer, scheduler and RNG files (tensors and plain
values, loaded weights-only). A hook registered here keeps them from writing the model: that would be the
whole base, gigabytes per checkpoint, where the adapter is a few megabytes. The newest save_total_limit
checkpoints are kept; accelerate's own rotation (ProjectConfiguration(total_limit=...)) does not fit: it names
folders by save count rather than step, and deletes the oldest before the new one is written, so a kill
during a save would leave one complete checkpoint fewer.
"""

import json
import os
import shutil
from pathlib import Path

from .errors import first_line

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
# flags whose change would make the resumed run a different run (other examples, order, shapes or model)
MUST_MATCH = ("base_model", "batch_size", "micro_batch_size", "cutoff_len", "val_set_size", "seed", "train_on_inputs",
              "group_by_length", "prompt_template_name", "chat_template", "lora_r", "num_epochs")
SAVED_BEFORE = {"chat_template": ""}  # what a checkpoint written before a flag existed ran with


def save_adapter_only(accelerator) -> None:
    """Make accelerate's save_state/load_state leave the model out (the adapter is saved and loaded by peft)."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def save_checkpoint(folder: Path, model, accelerator, step: int, arguments: dict, data_sha256: str, keep: int) -> None:
    """Write checkpoint `folder` from every process, then drop all but the newest `keep` beside it."""
    staging = folder.with_name(f".{folder.name}.saving")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            model.save_pretrained(staging)
        accelerator.save_state(staging)  # the main process writes the optimizer and scheduler, each process its RNGs
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "data_sha256": data_sha256, "arguments": arguments}
            (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
            _flush_to_disk(staging)
            if folder.exists():  # saved by an earlier run of these steps that a resume is now redoing
                shutil.rmtree(folder)
            os.replace(staging, folder)
            checkpoints = sorted((p for p in folder.parent.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit()),
                                 key=lambda p: int(p.name[len(PREFIX):]))
            for old in checkpoints[:-keep]:
                shutil.rmtree(old)
    except (OSError, RuntimeError) as error:  # a full disk: torch.save says so in a RuntimeError
        shutil.rmtree(staging, ignore_errors=True)
        reason = getattr(error, "strerror", None) or first_line(error)
        raise ValueError(f"--output_dir {folder.parent}: could not write {folder.name} ({reason}); free some space "
                         f"or choose another folder, then resume from the newest checkpoint") from None


def _flush_to_disk(folder: Path) -> None:
    """fsync every file and the folder: after the rename, a power cut cannot leave it empty."""
    for path in [*folder.iterdir(), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def load_checkpoint(folder: Path, model, accelerator, arguments: dict, data_sha256: str) -> int:
    """Restore the adapter, optimizer, schedule and RNGs from `folder`; returns the step it was saved at."""
    state = _read_state(folder)
    saved = state["arguments"]
    changed = [f"{k} ({saved.get(k, SAVED_BEFORE.get(k))!r} -> {arguments[k]!r})" for k in MUST_MATCH
               if saved.get(k, SAVED_BEFORE.get(k)) != arguments[k]]
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
    _check_loads_as_plain_data(rng_file)  # accelerate would carry on without the RNGs if it could not load them
    load_adapter_weights(model, folder)
    try:
        accelerator.load_state(folder)
    except Exception as error:  # pickle, torch and OS errors: a damaged optimizer.bin or scheduler.bin
        reason = first_line(error)
        raise ValueError(f"--resume_from_checkpoint {folder}: its optimizer or scheduler state cannot be read "
                         f"({reason}); resume from another checkpoint") from None
    return state["step"]


def _read_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        if not {"step", "data_sha256", "arguments"} <= set(state):
            raise ValueError("not a trainer state")
        return state
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"--resume_from_checkpoint {folder}: {STATE_FILE} cannot be read ({error}); "
                         f"resume from another checkpoint{_newest_complete_hint(folder)}") from None


def _check_loads_as_plain_data(path: Path) -> None:
    """Load `path` weights-only, as accelerate will: tensors, numbers and NumPy's RNG state, never code."""
    from accelerate.utils import load

    try:
        load(path)
    except Exception as error:  # an UnpicklingError for anything but plain data
        reason = first_line(error)
        raise ValueError(f"--resume_from_checkpoint {path.parent}: {path.name} is not plain saved state and is not "
                         f"loaded ({reason}); resume from a checkpoint this program wrote") from None


def load_adapter_weights(model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        weights = load_file(folder / "adapter_model.safetensors")
    except Exception as error:  # safetensors' own error for a truncated or damaged file, OSError
        raise ValueError(f"--resume_from_checkpoint {folder}: adapter_model.safetensors is damaged or cut short "
                         f"({first_line(error)})") from None
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"--resume_from_checkpoint {folder}: the adapter does not match this model and LoRA "
                         f"settings (missing {missing[0]}); use the flags it was trained with")


def resume_source(resume_from_checkpoint: str) -> tuple[str, Path] | None:
    """("checkpoint", folder) to resume exactly, ("adapter", folder) to start from an adapter's weights, or None.
    An incomplete checkpoint (a run killed while saving it, by an earlier version) is an error naming the newest
    complete one, never taken for an adapter."""
    if not resume_from_checkpoint:
        return None
    path = Path(resume_from_checkpoint).expanduser()
    if (path / STATE_FILE).is_file():
        return "checkpoint", path
    if path.name.startswith((PREFIX, f".{PREFIX}")) or (path / "optimizer.bin").is_file():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: an incomplete checkpoint (no "
                         f"{STATE_FILE}: the run was stopped while saving it){_newest_complete_hint(path)}")
    if (path / "adapter_model.safetensors").is_file():
        return "adapter", path
    raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: neither a checkpoint folder "
                     f"({STATE_FILE}) nor an adapter folder (adapter_model.safetensors)")


def _newest_complete_hint(folder: Path) -> str:
    complete = [p for p in folder.parent.glob(f"{PREFIX}*") if p != folder and (p / STATE_FILE).is_file()
                and p.name[len(PREFIX):].isdigit()]
    if not complete:
        return "; no complete checkpoint is left beside it: start again"
    return f"; the newest complete one is {max(complete, key=lambda p: int(p.name[len(PREFIX):]))}"
