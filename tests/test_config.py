"""config.py: every flag with its default and help, and one validation naming the flag, the value and a fix."""

import os
from dataclasses import fields

import pytest
from conftest import REPO, run_script

from alpaca_lora.config import TrainConfig


def test_help_lists_every_flag_with_its_default():
    result = run_script(REPO / "finetune.py", "--help", env={**os.environ, "PAGER": "cat"})
    assert result.returncode == 0
    text = result.stdout + result.stderr  # fire writes help to stderr when it has no pager
    for field in fields(TrainConfig):
        assert f"--{field.name}=" in text, field.name
    assert "Default: 'yahma/alpaca-cleaned'" in text and "Default: 128" in text and "Default: 0.0003" in text


@pytest.mark.parametrize("overrides, message", [
    (dict(base_model=""), "--base_model is required"),
    (dict(batch_size=10, micro_batch_size=4), "--batch_size 10 is not divisible by --micro_batch_size 4"),
    (dict(prompt_template_name="vicuna"), "--prompt_template_name 'vicuna': no such template"),
    (dict(learning_rate="fast"), "--learning_rate 'fast': must be a number"),
    (dict(micro_batch_size=0), "--micro_batch_size 0: must be a whole number >= 1"),
    (dict(load_8bit=True, load_4bit=True), "--load_8bit and --load_4bit: choose one"),
    (dict(lora_target_modules=[]), "--lora_target_modules"),
    (dict(wandb_watch="everything"), "--wandb_watch 'everything'"),
])
def test_bad_flags_name_the_flag(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{"base_model": "m", **overrides}).validated()


def test_target_module_spellings():
    for spelling in ("[q_proj,v_proj]", "q_proj,v_proj", ["q_proj", "v_proj"], ("q_proj", "v_proj")):
        assert TrainConfig(base_model="m", lora_target_modules=spelling).validated().lora_target_modules == ["q_proj", "v_proj"]
    assert TrainConfig(base_model="m", lora_target_modules="all-linear").validated().lora_target_modules == "all-linear"


@pytest.mark.parametrize("script, args, message", [
    ("finetune.py", ["--num_epoch", "3"], "finetune.py: error: --num_epoch: no such flag; did you mean --num_epochs? "
                                          "(finetune.py --help lists them)"),
    ("generate.py", ["--instrucion", "hi"], "generate.py: error: --instrucion: no such flag; did you mean --instruction?"),
    ("evaluate.py", ["loss", "--lora_weight", "x"], "evaluate.py: error: --lora_weight: no such flag; did you mean "
                                                    "--lora_weights? (evaluate.py loss --help lists them)"),
    ("evaluate.py", ["loss", "--write", "x"], "evaluate.py: error: --write: no such flag"),
    ("export_hf.py", ["stray"], "export_hf.py: error: 'stray': a value without a flag"),
])
def test_a_mistyped_flag_stops_the_command_before_any_work(tmp_path, script, args, message):
    # a base model that is not there: the flag error comes first, so nothing was loaded, read or trained
    result = run_script(REPO / script, *args, "--base_model", tmp_path / "absent", timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-500:]


def test_flags_may_be_spelled_as_fire_takes_them():
    from alpaca_lora.console import check_flags

    def command(*, load_4bit: bool = False, lora_r: int = 8):
        pass
    for argv in (["--load_4bit", "--lora_r", "16"], ["--noload_4bit"], ["--lora-r=4"], ["--load_4bit", "False"],
                 ["--help"], ["--lora_r", "4", "--", "--interactive"]):
        check_flags("finetune.py", command, argv)


def test_help_shows_whole_defaults_and_plain_types():
    text = run_script(REPO / "finetune.py", "--help").stdout
    assert "Default: '~/.cache/alpaca-lora/tokenized'" in text and "Optional[" not in text
    assert "--load_8bit=LOAD_8BIT\n      8-bit base weights" in text and "Type: bool, or left out for auto." in text
    loss_help = run_script(REPO / "evaluate.py", "loss", "--help")
    loss_help = loss_help.stdout + loss_help.stderr  # fire writes its help to stderr when it has no pager
    assert "--lora_weights" in loss_help and "--write" not in loss_help


def test_an_os_error_is_one_line_naming_the_file(capsys):
    from alpaca_lora.console import _fire

    def full_disk():
        raise OSError(28, "No space left on device", "/data/out/adapter_model.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        _fire("finetune.py", full_disk, [])
    assert exit_info.value.code == "finetune.py: error: /data/out/adapter_model.safetensors: No space left on device"
