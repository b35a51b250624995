import json
import os
import sys

import pytest
import torch
from conftest import REPO, losses, run_script, tiny_config
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alpaca_lora.cpu_attention import CPU_SDPA
from alpaca_lora.data import load_rows, split_rows, tokenize_rows, validate_rows
from alpaca_lora.model import fast_bf16_available, load_tokenizer
from alpaca_lora.templates import load_template
from alpaca_lora.train import train


def test_training_writes_a_self_describing_adapter(tiny_base, alpaca_file, tmp_path):
    out = tmp_path / "adapter"
    result = train(tiny_config(tiny_base, alpaca_file, out, num_epochs=2, eval_steps=5))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "training_summary.json", "README.md", "validation_rows.json", "train_log.jsonl"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["base_model"] == str(tiny_base)
    assert summary["prompt_template"]["name"] == "alpaca" and "{instruction}" in summary["prompt_template"]["prompt_no_input"]
    assert summary["arguments"]["lora_r"] == 8 and summary["arguments"]["world_size"] == 1
    assert summary["data"]["rows"] == 48 and summary["data"]["train_rows"] == 40 and summary["data"]["validation_rows"] == 8
    assert len(summary["data"]["sha256"]) == 64
    assert summary["steps"] == 10 and summary["precision"] == "fp32" and summary["attention"] == CPU_SDPA
    assert summary["final_train_loss"] == result.history[-1]["loss"]
    assert summary["final_validation_loss"] == result.history[-1]["val_loss"] and "val_loss" in result.history[4]
    # the throughput is the real (unpadded) tokens of every step over the time the steps took
    train_rows = split_rows(validate_rows(load_rows(str(alpaca_file)), False)[0], 8, seed=0)[0]
    examples = tokenize_rows(train_rows, load_tokenizer(str(tiny_base)), load_template("alpaca"), 512, False).examples
    assert sum(r["real_tokens"] for r in result.history) == 2 * sum(len(e.input_ids) for e in examples)  # 2 epochs
    assert summary["real_tokens_per_second"] == pytest.approx(
        sum(r["real_tokens"] for r in result.history) / summary["train_seconds"])
    assert summary["train_seconds"] == pytest.approx(sum(r["seconds"] for r in result.history), abs=1e-3)
    assert summary["train_seconds"] < summary["wall_seconds"]
    assert summary["data"]["truncated_examples"] == sum(e.truncated for e in examples) == 0  # all fit in 512
    assert len(json.loads((out / "validation_rows.json").read_text())) == 8
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged == json.loads(json.dumps(result.history))
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_base}" in card and "CC BY-NC 4.0" in card and "hallucinate" in card
    assert f"fp32 on cpu ({CPU_SDPA} attention)" in card
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base)

    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert len(lora_b) == 4 and all(tensor.abs().sum() > 0 for tensor in lora_b)

    # the saved adapter, reloaded the standard way, computes exactly what the trained model computes
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out).eval()
    trained = result.model.eval().to("cpu")
    input_ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, trained(input_ids=input_ids).logits,
                                   rtol=0, atol=0)
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_base)(input_ids=input_ids).logits
    assert not torch.allclose(base_logits, trained(input_ids=input_ids).logits)


def test_loss_falls(tiny_base, alpaca_file, tmp_path):
    result = train(tiny_config(tiny_base, alpaca_file, tmp_path, num_epochs=4, lora_target_modules="all-linear",
                               learning_rate=2e-2))
    first_epoch, last_epoch = losses(result.history)[:5], losses(result.history)[-5:]
    assert sum(last_epoch) / 5 < sum(first_epoch) / 5 - 0.05  # a random 2-layer base learns little more


@pytest.mark.slow
def test_step_loss_does_not_depend_on_how_the_batch_is_split(tiny_base, alpaca_file, tmp_path):
    """One step = the mean over every target token of the global batch, however many micro-batches it takes."""
    whole = train(tiny_config(tiny_base, alpaca_file, tmp_path / "a", micro_batch_size=8, lora_dropout=0.0))
    split = train(tiny_config(tiny_base, alpaca_file, tmp_path / "b", micro_batch_size=2, lora_dropout=0.0))
    assert losses(split.history) == pytest.approx(losses(whole.history), rel=1e-5)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(tiny_base, alpaca_file, tmp_path):
    plain = train(tiny_config(tiny_base, alpaca_file, tmp_path / "a"))
    checkpointed = train(tiny_config(tiny_base, alpaca_file, tmp_path / "b", gradient_checkpointing=True))
    assert losses(checkpointed.history) == pytest.approx(losses(plain.history), rel=1e-5)


@pytest.mark.slow
def test_fast_lora_dropout_changes_only_the_masks(tiny_base, alpaca_file, tmp_path):
    """Without dropout, bf16 training with the LoRA input left in bf16 logs exactly peft's losses (its fp32
    copy changed nothing autocast did not undo); with dropout, both draw masks of the same rate and the runs
    stay close but differ."""
    runs = {(fast, p): losses(train(tiny_config(tiny_base, alpaca_file, tmp_path / f"{fast}-{p}", bf16=True,
                                                 fast_lora_dropout=fast, lora_dropout=p)).history)
            for fast in (True, False) for p in (0.0, 0.1)}
    assert runs[True, 0.0] == runs[False, 0.0]
    assert runs[True, 0.1] != runs[False, 0.1]
    assert runs[True, 0.1] == pytest.approx(runs[False, 0.1], rel=0.05)


@pytest.mark.slow
def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tiny_base, alpaca_file, tmp_path):
    """Stopped after step 4 of 10 (epoch 1 of 2) and resumed: weights, optimizer, schedule, dropout RNG and
    data position all come back, so steps 5..10 match to 1e-5."""
    uninterrupted = train(tiny_config(tiny_base, alpaca_file, tmp_path / "full", num_epochs=2, save_steps=4,
                                      lora_dropout=0.1))
    checkpoints = sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-4", "checkpoint-8"]
    resumed = train(tiny_config(tiny_base, alpaca_file, tmp_path / "resumed", num_epochs=2, save_steps=4,
                                lora_dropout=0.1, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4")))
    assert [r["step"] for r in resumed.history] == list(range(5, 11))
    assert losses(resumed.history) == pytest.approx(losses(uninterrupted.history)[4:], rel=1e-5, abs=1e-5)
    # a different seed would give different losses: the match is not an accident
    other = train(tiny_config(tiny_base, alpaca_file, tmp_path / "other", num_epochs=2, seed=1, lora_dropout=0.1))
    assert losses(other.history)[4:] != pytest.approx(losses(uninterrupted.history)[4:], rel=1e-3)


def test_resuming_with_other_settings_is_refused(tiny_base, alpaca_file, tmp_path):
    train(tiny_config(tiny_base, alpaca_file, tmp_path / "full", save_steps=2))
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*batch_size \(8 -> 16\)"):
        train(tiny_config(tiny_base, alpaca_file, tmp_path / "x", batch_size=16,
                          resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")))
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*chat_template \('' -> 'alpaca'\)"):
        train(tiny_config(tiny_base, alpaca_file, tmp_path / "y", chat_template="alpaca",
                          resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")))


def test_only_the_last_checkpoints_are_kept(tiny_base, alpaca_file, tmp_path):
    train(tiny_config(tiny_base, alpaca_file, tmp_path, num_epochs=3, save_steps=2, save_total_limit=3))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12", "checkpoint-14"]


@pytest.mark.slow
def test_bf16_and_4bit_runs_train(tiny_base, alpaca_file, tmp_path):
    bf16 = train(tiny_config(tiny_base, alpaca_file, tmp_path / "bf16", bf16=True, eval_steps=2))
    assert bf16.summary.precision == "bf16"
    qlora = train(tiny_config(tiny_base, alpaca_file, tmp_path / "4bit", load_4bit=True, eval_steps=2))
    assert qlora.summary.precision == "4bit"
    for result in (bf16, qlora):
        assert all(torch.isfinite(torch.tensor(losses(result.history))))
        lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # gradients kept flowing after the eval passes


def test_defaults_follow_the_device(tiny_base, alpaca_file, tmp_path):
    """alpaca-lora's choices on a GPU (8-bit base, gradient checkpointing, bf16 where supported, memory
    reported); a full-precision base without recomputation on a CPU."""
    result = train(tiny_config(tiny_base, alpaca_file, tmp_path, load_8bit=None, bf16=None, max_steps=1))
    summary = result.summary
    if torch.cuda.is_available():
        assert (summary.precision, summary.gradient_checkpointing) == ("8bit", True)
        memory = summary.gpu_memory_mb
        assert 0 < memory["after_loading"] <= memory["peak_while_loading"] and memory["peak_while_training"] > 0
    else:
        assert summary.precision == ("bf16" if fast_bf16_available(torch.device("cpu")) else "fp32")
        assert summary.gradient_checkpointing is False and summary.gpu_memory_mb is None
    assert result.summary.arguments["gradient_checkpointing"] is None  # "auto" is what was asked for
    assert ("peak GPU memory" in (tmp_path / "README.md").read_text()) == torch.cuda.is_available()


def test_wandb_offline_run_is_recorded(tiny_base, alpaca_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed here (the project's dependencies include it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config(tiny_base, alpaca_file, tmp_path / "out", wandb_project="alpaca-test", wandb_run_name="tiny",
                      wandb_log_model="true"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.slow
@pytest.mark.parametrize("base_flags, port", [([], 29533), (["--load_8bit", True], 29534)], ids=["fp32", "8bit"])
def test_two_processes_match_one_process(tiny_base, alpaca_file, tmp_path, base_flags, port):
    """torchrun with 2 CPU processes (gloo), micro-batch 4 each, = 1 process accumulating 2 micro-batches of 4
    (on the CPU also where there is a GPU: two processes cannot share one GPU under NCCL). The 8-bit base
    brings gradient checkpointing in its reentrant form, whose backward DDP must also see through."""
    flags = ["--base_model", tiny_base, "--data_path", alpaca_file, "--batch_size", 8, "--micro_batch_size", 4,
             "--num_epochs", 1, "--val_set_size", 8, "--cutoff_len", 512, "--learning_rate", 1e-2, "--bf16", False,
             "--warmup_steps", 1, "--lora_dropout", 0.0, "--eval_steps", 5, *base_flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    one = run_script(REPO / "finetune.py", *flags, "--output_dir", tmp_path / "one", env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                     REPO / "finetune.py", *flags, "--output_dir", tmp_path / "two", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one_log, two_log = ([json.loads(line) for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
                        for d in ("one", "two"))
    assert len(one_log) == len(two_log) == 5
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-4)
    assert two_log[-1]["val_loss"] == pytest.approx(one_log[-1]["val_loss"], rel=1e-4)
    summary = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert summary["arguments"]["world_size"] == 2
    assert summary["gradient_checkpointing"] == bool(base_flags) and summary["precision"] == ("8bit" if base_flags else "fp32")
    lora_b = [t for name, t in load_file(tmp_path / "two" / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # gradients reached every adapter through DDP


# ---- bad input ----

def _bad_inputs(tiny_base, alpaca_file, tmp_path):
    malformed = tmp_path / "malformed.json"
    malformed.write_text('[{"instruction": "a", "output": "b"},')
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps([{"prompt": "a", "completion": "b"}] * 3))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "system", "content": "Be kind."}] * (i == 2) + [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": f"Hello {i}"}]}) for i in range(1, 13)))
    alternating = tmp_path / "alternating.jinja"  # refuses a system message, as Gemma 2's template does
    alternating.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                           "{% endif %}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")
    return {
        "missing base model": (["--base_model", tmp_path / "no-model"], "--base_model"),
        "missing data": (["--data_path", tmp_path / "no-data.json"], "--data_path"),
        "malformed JSON": (["--data_path", malformed], "malformed JSON at line 1 column 38"),
        "wrong schema": (["--data_path", schema], "3 bad row(s) of 3: row 1: 'instruction' is missing"),
        "empty dataset": (["--data_path", empty], "no usable rows"),
        "nothing fits cutoff_len": (["--cutoff_len", 8], "--cutoff_len 8: no training example fits"),
        "indivisible batch": (["--batch_size", 10, "--micro_batch_size", 4], "--batch_size 10 is not divisible"),
        "unwritable output_dir": (["--output_dir", blocker / "out"], "not writable"),
        "unknown template": (["--prompt_template_name", "nope"], "--prompt_template_name 'nope'"),
        "unreachable hub model": (["--base_model", "huggyllama/llama-7b"], "could not load its tokenizer"),
        "unknown chat template": (["--chat_template", "vicuna"], "--chat_template 'vicuna': no such template"),
        "conversations, no template": (["--data_path", chats], "--chat_template: the data are conversations and the "
                                                               "base model's tokenizer has no chat template"),
        "a row the template refuses": (["--data_path", chats, "--chat_template", alternating],
                                       "1 bad row(s) of 12: row 2: chat template"),
        "a marker not in the vocabulary": (["--data_path", chats, "--chat_template", "chatml"],
                                           "chat template chatml: it writes no special token of this tokenizer"),
    }


def test_bad_input_exits_with_one_line_and_no_adapter(tiny_base, alpaca_file, tmp_path, monkeypatch, capsys):
    from alpaca_lora import console

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    for case, (args, message) in _bad_inputs(tiny_base, alpaca_file, tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        argv = ["finetune.py", "--base_model", tiny_base, "--data_path", alpaca_file, "--output_dir", out,
                "--val_set_size", 4, "--batch_size", 8, "--micro_batch_size", 4, *args]
        monkeypatch.setattr(sys, "argv", [str(a) for a in argv])
        with pytest.raises(SystemExit) as exit_info:
            console.finetune()
        error = str(exit_info.value.code)
        assert error.startswith("finetune.py: error: ") and "\n" not in error, case
        assert message in error, (case, error)
        assert not (out / "adapter_model.safetensors").exists() and not (out / "training_summary.json").exists()


def test_bad_input_from_the_command_line(tmp_path):
    result = run_script(REPO / "finetune.py", "--base_model", tmp_path / "nothing-here", "--output_dir", tmp_path / "o")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"finetune.py: error: --base_model {tmp_path}/nothing-here: no such folder; pass a local model folder or a hub id"
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


# ---- the output folder ----

def test_a_finished_adapter_is_not_trained_over_without_overwrite(tiny_base, alpaca_file, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    train(tiny_config(tiny_base, alpaca_file, out, max_steps=1))
    finished = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=rf"--output_dir {out}: holds a finished adapter .* --overwrite_output_dir"):
        train(tiny_config(tiny_base, alpaca_file, out, max_steps=1))
    assert (out / "adapter_model.safetensors").read_bytes() == finished

    # with --overwrite_output_dir the old adapter goes first: a run killed before it ends leaves no adapter behind
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("alpaca_lora.train.train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_base, alpaca_file, out, max_steps=1, overwrite_output_dir=True))
    assert not {"adapter_model.safetensors", "training_summary.json", "README.md"} & {p.name for p in out.iterdir()}


def test_another_runs_checkpoints_are_continued_or_replaced_never_mixed(tiny_base, alpaca_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_base, alpaca_file, out, num_epochs=2, save_steps=4))
    (out / "adapter_model.safetensors").unlink()  # as if killed before the end
    with pytest.raises(ValueError, match=r"holds checkpoints of another run \(checkpoint-8\); pass "
                                         r"--resume_from_checkpoint to continue it"):
        train(tiny_config(tiny_base, alpaca_file, out, num_epochs=2, save_steps=4))
    resumed = train(tiny_config(tiny_base, alpaca_file, out, num_epochs=2, save_steps=4,
                                resume_from_checkpoint=str(out / "checkpoint-8")))
    assert [r["step"] for r in resumed.history] == [9, 10]


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_writes(tiny_base, alpaca_file, tmp_path):
    from alpaca_lora.adapter_folder import claim_output_dir

    folder, lock = claim_output_dir(str(tmp_path / "busy"), overwrite=False, resume_checkpoint=None)
    try:
        with pytest.raises(ValueError, match="another run is writing to it now"):
            train(tiny_config(tiny_base, alpaca_file, folder, max_steps=1))
    finally:
        lock.close()
    assert train(tiny_config(tiny_base, alpaca_file, folder, max_steps=1)).summary.steps == 1  # free again


def test_a_local_base_model_is_recorded_absolute(tiny_base, alpaca_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_base.parent)
    result = train(tiny_config(f"./{tiny_base.name}", alpaca_file, tmp_path / "out", max_steps=1))
    assert result.summary.base_model == str(tiny_base.resolve())
    monkeypatch.chdir(tmp_path)  # the adapter works from anywhere
    from alpaca_lora.adapter_folder import describe_adapter

    assert describe_adapter(str(tmp_path / "out")).base_model_or("") == str(tiny_base.resolve())


def test_data_is_checked_before_the_tokenizer_loads(tiny_base, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the data was checked")
    monkeypatch.setattr("alpaca_lora.train.load_tokenizer", no_loading)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a"}]')
    with pytest.raises(ValueError, match="1 bad row"):
        train(tiny_config(tiny_base, bad, tmp_path / "out"))
    with pytest.raises(ValueError, match="no such file"):
        train(tiny_config(tiny_base, tmp_path / "missing.json", tmp_path / "out"))
