"""checkpoints.py: accelerate saves the optimizer, schedule and RNGs, peft the adapter, and nothing saves the base."""

import json

import pytest
import torch

from alpaca_lora.checkpoints import load_checkpoint, resume_source, save_adapter_only, save_checkpoint
from alpaca_lora.model import attach_lora, load_model

ARGUMENTS = {"base_model": "tiny", "batch_size": 8, "micro_batch_size": 4, "cutoff_len": 512, "val_set_size": 8,
             "seed": 0, "train_on_inputs": False, "group_by_length": False, "prompt_template_name": "alpaca", "chat_template": "",
             "lora_r": 8, "num_epochs": 1}


@pytest.fixture
def run(tiny_base):
    """A LoRA model on the tiny base, its AdamW and schedule prepared by accelerate, one step taken."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    torch.manual_seed(0)
    model = attach_lora(load_model(str(tiny_base), None, False, torch.device("cpu")), r=8, alpha=16, dropout=0.0,
                        target_modules=["q_proj", "v_proj"], use_dora=False, use_rslora=False,
                        gradient_checkpointing=False, quantization=None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(trainable, lr=1e-2))
    scheduler = accelerator.prepare_scheduler(torch.optim.lr_scheduler.LinearLR(optimizer.optimizer, 1.0, 0.1, 10))
    save_adapter_only(accelerator)

    def step():
        model(input_ids=torch.randint(3, 500, (2, 16))).logits.float().pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    step()
    return accelerator, model, optimizer, scheduler, step


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_a_checkpoint_restores_adapter_optimizer_schedule_and_rng_exactly(run, tiny_base, tmp_path):
    accelerator, model, optimizer, scheduler, step = run
    folder = tmp_path / "checkpoint-1"
    save_checkpoint(folder, model, accelerator, 1, ARGUMENTS, "sha", keep=3)
    saved_adapter, saved_moments = _adapter(model), [s["exp_avg"].clone() for s in optimizer.state.values()]
    saved_lr, next_draw = scheduler.get_last_lr(), torch.rand(4)

    step()  # the run goes on, then dies: everything below must come back as it was at the save
    torch.rand(100)
    assert scheduler.get_last_lr() != saved_lr
    assert load_checkpoint(folder, model, accelerator, ARGUMENTS, "sha") == 1
    assert all(torch.equal(p, saved_adapter[n]) for n, p in _adapter(model).items())
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(optimizer.state.values(), saved_moments))
    assert scheduler.get_last_lr() == saved_lr and torch.equal(torch.rand(4), next_draw)


def test_a_checkpoint_holds_the_adapter_not_the_base(run, tiny_base, tmp_path):
    accelerator, model, *_ = run
    folder = tmp_path / "checkpoint-1"
    save_checkpoint(folder, model, accelerator, 1, ARGUMENTS, "sha", keep=3)
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.bin", "scheduler.bin",
            "random_states_0.pkl", "trainer_state.json"} <= names
    assert not any(name.startswith("model") for name in names)  # accelerate's own save of the whole model
    base_bytes = (tiny_base / "model.safetensors").stat().st_size
    assert sum(p.stat().st_size for p in folder.iterdir()) < base_bytes / 4
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 1, "data_sha256": "sha",
                                                                       "arguments": ARGUMENTS}
    assert resume_source(str(folder)) == ("checkpoint", folder)


def test_resuming_needs_every_process_s_rng_and_the_same_data(run, tmp_path):
    accelerator, model, *_ = run
    folder = tmp_path / "checkpoint-1"
    save_checkpoint(folder, model, accelerator, 1, ARGUMENTS, "sha", keep=3)
    with pytest.raises(ValueError, match=r"the run was started with other settings: lora_r \(8 -> 16\), data_path"):
        load_checkpoint(folder, model, accelerator, {**ARGUMENTS, "lora_r": 16}, "other sha")
    (folder / "random_states_0.pkl").unlink()  # saved by a run with another number of processes
    with pytest.raises(ValueError, match="no random_states_0.pkl; resume with as many processes as saved it"):
        load_checkpoint(folder, model, accelerator, ARGUMENTS, "sha")
    (folder / "optimizer.bin").rename(folder / "optimizer.pt")  # the layout of checkpoints before accelerate's
    with pytest.raises(ValueError, match="written by an earlier alpaca-lora"):
        load_checkpoint(folder, model, accelerator, ARGUMENTS, "sha")


def test_only_the_newest_checkpoints_are_kept_by_step_not_by_name(run, tmp_path):
    accelerator, model, *_ = run
    for step in (2, 4, 10, 12):  # "checkpoint-10" sorts before "checkpoint-2" by name
        save_checkpoint(tmp_path / f"checkpoint-{step}", model, accelerator, step, ARGUMENTS, "sha", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-12"]


class _RunsAShellCommand:
    """What a crafted checkpoint holds: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_a_crafted_checkpoint_file_is_refused_and_runs_nothing(run, tmp_path, name):
    import pickle

    accelerator, model, *_ = run
    folder = tmp_path / "checkpoint-1"
    save_checkpoint(folder, model, accelerator, 1, ARGUMENTS, "sha", keep=3)
    marker = tmp_path / "pwned"
    (folder / name).write_bytes(pickle.dumps(_RunsAShellCommand(marker)))
    with pytest.raises(ValueError, match=rf"--resume_from_checkpoint {folder}: .*(not plain saved state|cannot be read)"):
        load_checkpoint(folder, model, accelerator, ARGUMENTS, "sha")
    assert not marker.exists()


def test_a_checkpoint_is_whole_or_absent(run, tmp_path, monkeypatch):
    accelerator, model, *_ = run
    save_checkpoint(tmp_path / "checkpoint-1", model, accelerator, 1, ARGUMENTS, "sha", keep=3)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(accelerator, "save_state", disk_full)  # killed, or the disk full, half way through
    with pytest.raises(ValueError, match=r"could not write checkpoint-2 \(No space left on device\); free some space"):
        save_checkpoint(tmp_path / "checkpoint-2", model, accelerator, 2, ARGUMENTS, "sha", keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no half checkpoint, no staging


def test_an_incomplete_or_damaged_checkpoint_names_the_newest_complete_one(run, tmp_path):
    accelerator, model, *_ = run
    for step in (1, 2):
        save_checkpoint(tmp_path / f"checkpoint-{step}", model, accelerator, step, ARGUMENTS, "sha", keep=3)
    # as an earlier version left it when killed between the adapter and trainer_state.json
    (tmp_path / "checkpoint-3").mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.bin"):
        (tmp_path / "checkpoint-3" / name).write_bytes((tmp_path / "checkpoint-2" / name).read_bytes())
    with pytest.raises(ValueError, match=rf"an incomplete checkpoint .*the newest complete one is {tmp_path}/checkpoint-2"):
        resume_source(str(tmp_path / "checkpoint-3"))
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("")
    with pytest.raises(ValueError, match=r"checkpoint-2: trainer_state.json cannot be read \(Expecting value: line 1 "
                                         rf"column 1 .*\); .*the newest complete one is {tmp_path}/checkpoint-1"):
        load_checkpoint(tmp_path / "checkpoint-2", model, accelerator, ARGUMENTS, "sha")
