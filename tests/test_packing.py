"""Padding-free packing and response-only logits compute exactly what the standard padded path computes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import DEVICES, losses, nudge_lora_b, tiny_config

from alpaca_lora.batching import packed_collate, pad_collate
from alpaca_lora.data import IGNORE_INDEX, tokenize_rows
from alpaca_lora.loss import HeadCrossEntropy, head_chunk_rows, padded_loss, response_only_loss
from alpaca_lora.model import attach_lora, attention_implementation, load_model, load_tokenizer
from alpaca_lora.templates import load_template
from alpaca_lora.train import train


@pytest.fixture(scope="module")
def examples(tiny_base, alpaca_rows):
    tokenizer = load_tokenizer(str(tiny_base))
    return tokenize_rows(alpaca_rows[:6], tokenizer, load_template("alpaca"), 512, train_on_inputs=False).examples


@pytest.fixture(scope="module", params=DEVICES)
def base(tiny_base, request):
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, device_map=request.param).eval()


def test_every_packed_example_gets_the_logits_it_gets_alone(base, examples):
    rows = [examples[:3], examples[3:4], examples[4:]]  # rows of different lengths: the short ones get a filler
    batch = {k: v.to(base.device) for k, v in packed_collate(rows, pad_token_id=0).items()}
    widest = max(sum(len(e.input_ids) for e in row) for row in rows)
    assert batch["input_ids"].shape == (3, -(-widest // 64) * 64)
    with torch.no_grad():
        packed = base(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                alone = base(input_ids=torch.tensor([example.input_ids.tolist()], device=base.device), use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, start:start + len(example.input_ids)], alone, rtol=1e-5, atol=1e-5)
                start += len(example.input_ids)


def test_no_token_attends_across_an_example_boundary(base, examples):
    """Changing every token of the first example changes nothing in the others; the control shows that
    with an all-ones attention mask (the easy mistake) it would."""
    batch = {k: v.to(base.device) for k, v in packed_collate([examples[:3]], pad_token_id=0).items()}
    first = len(examples[0].input_ids)
    changed = batch["input_ids"].clone()
    changed[0, :first] = torch.randint(3, 500, (first,), generator=torch.Generator().manual_seed(0)).to(base.device)
    with torch.no_grad():
        def rest(input_ids, **extra):
            return base(input_ids=input_ids, position_ids=batch["position_ids"], use_cache=False, **extra).logits[0, first:]
        assert torch.equal(rest(batch["input_ids"]), rest(changed))
        ones = torch.ones_like(batch["input_ids"])
        assert not torch.allclose(rest(batch["input_ids"], attention_mask=ones), rest(changed, attention_mask=ones))


def _lora_model(tiny_base, device, target_modules="all-linear"):
    torch.manual_seed(0)
    model = attach_lora(load_model(str(tiny_base), None, False, torch.device(device)), r=4, alpha=8, dropout=0.0,
                        target_modules=target_modules, use_dora=False, use_rslora=False, gradient_checkpointing=False,
                        quantization=None)
    return nudge_lora_b(model)


def _loss_and_grads(model, loss_sum, batch):
    batch = {k: v.to(model.device) for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_rows_have_segment_positions_and_no_mask(examples):
    batch = packed_collate([examples[:2], examples[2:3]], pad_token_id=0)
    first, second = len(examples[0].input_ids), len(examples[1].input_ids)
    assert "attention_mask" not in batch
    assert batch["position_ids"][0, :first + second].tolist() == list(range(first)) + list(range(second))
    tail = batch["input_ids"].shape[1] - len(examples[2].input_ids)
    assert batch["position_ids"][1, len(examples[2].input_ids):].tolist() == list(range(tail))
    assert set(batch["targets"][1, len(examples[2].input_ids):].tolist()) <= {IGNORE_INDEX}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,head", [("packed", "frozen"), ("padded", "frozen"), ("packed", "adapted")])
def test_response_only_logits_give_the_standard_loss_and_gradients(tiny_base, examples, layout, head, device,
                                                                   monkeypatch):
    """The frozen head goes through HeadCrossEntropy; a head with LoRA on it through autograd, chunk by chunk."""
    monkeypatch.setattr("alpaca_lora.loss.LOGIT_CHUNK", 64)  # several chunks even on these short examples
    adapted = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = _lora_model(tiny_base, device, "all-linear" if head == "frozen" else adapted)
    standard_loss, standard_grads = _loss_and_grads(model, padded_loss, pad_collate(examples, 0))
    batch = packed_collate([examples[:2], examples[2:]], 0) if layout == "packed" else pad_collate(examples, 0)
    count = int((batch["targets"] != IGNORE_INDEX).sum())
    assert count > 3 * 64 and count % head_chunk_rows(count)  # several chunks, the last one filled up
    loss, grads = _loss_and_grads(model, response_only_loss, batch)
    torch.testing.assert_close(loss, standard_loss, rtol=1e-5, atol=0)
    assert grads.keys() == standard_grads.keys()
    assert len(grads) == 2 * 7 * 2 + (2 if head == "adapted" else 0)  # A and B: 7 linears, 2 layers (+ the head)
    for name in grads:  # relative to the gradient's norm: elementwise, fp32 summation order alone exceeds 1e-5
        error = (grads[name] - standard_grads[name]).norm() / standard_grads[name].norm()
        assert error < 1e-5, (name, error.item())


def test_lm_head_matmuls_see_a_few_shapes_whatever_the_target_count(monkeypatch):
    """However many targets a micro-batch has, the head's matmuls take one of 16 shapes (a CPU caches a kernel
    with its buffers per shape), and filling the last chunk costs fewer than 16 rows per chunk. Every chunk
    through the compiled softmax, as a large vocabulary's are."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr("alpaca_lora.loss.fused_softmax_cross_entropy.compile_from", 0)

    class MatmulShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default:
                self.shapes.add((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    weight = torch.randn(100, 8)
    recorder = MatmulShapes()
    for count in range(1, 700, 7):
        hidden = torch.randn(count, 8, requires_grad=True)
        targets = torch.randint(0, 100, (count,))
        with recorder:
            loss = HeadCrossEntropy.apply(hidden, weight, targets)
            loss.backward()
        reference = hidden.detach().requires_grad_()
        reference_loss = torch.nn.functional.cross_entropy(reference @ weight.T, targets, reduction="sum")
        reference_loss.backward()
        torch.testing.assert_close(loss, reference_loss)
        torch.testing.assert_close(hidden.grad, reference.grad)
        rows = head_chunk_rows(count)
        chunks = -(-count // rows)
        assert rows % 16 == 0 and rows <= 256 and chunks * rows - count < 16 * chunks
    rows_seen = {shape[0][0] for shape in recorder.shapes}
    assert rows_seen <= set(range(16, 257, 16)) and len(recorder.shapes) <= 2 * 16  # forward and gradient matmuls


@pytest.mark.slow
def test_packed_and_padded_training_log_the_same_losses(tiny_base, alpaca_file, tmp_path):
    packed = train(tiny_config(tiny_base, alpaca_file, tmp_path / "packed", packing=True, lora_dropout=0.0,
                               num_epochs=2, eval_steps=5))
    padded = train(tiny_config(tiny_base, alpaca_file, tmp_path / "padded", packing=False, lora_dropout=0.0,
                               num_epochs=2, eval_steps=5), loss_sum=padded_loss)
    assert losses(packed.history) == pytest.approx(losses(padded.history), rel=1e-5)
    assert packed.history[-1]["val_loss"] == pytest.approx(padded.history[-1]["val_loss"], rel=1e-5)


def test_flash_attention_is_chosen_only_where_it_can_run(monkeypatch):
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: True)
    assert attention_implementation(torch.device("cuda"), bf16=True) == "flash_attention_2"
    assert attention_implementation(torch.device("cuda"), bf16=False) == "sdpa"  # flash-attention has no fp32
    assert attention_implementation(torch.device("cpu"), bf16=True) == "sdpa"
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    assert attention_implementation(torch.device("cuda"), bf16=True) == "sdpa"


def _varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What flash-attention's variable-length kernel computes, in plain PyTorch: causal attention within each
    segment, the segments found from position_ids by the same transformers code that feeds the real kernel."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    assert attention_mask is None and query.shape[0] == 1  # one row per micro-batch, no mask
    position_ids = kwargs["position_ids"]
    if _is_packed_sequence(position_ids, batch_size=1):  # transformers takes the varlen kernel
        (starts, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
    else:  # one example alone in its row: plain causal attention
        starts = torch.tensor([0, query.shape[2]])
    _varlen_reference_attention.segments.append(len(starts) - 1)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    output = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling)
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())], dim=2)
    return output.transpose(1, 2).contiguous(), None


@pytest.mark.slow
def test_a_varlen_attention_kernel_gets_one_row_per_micro_batch_and_the_same_losses(tiny_base, alpaca_file, tmp_path,
                                                                                  monkeypatch):
    """With flash-attention (stood in for on a CPU by the reference above, registered as transformers registers
    kernels), each packed micro-batch goes in one row and training logs the padded path's losses."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("varlen_reference", _varlen_reference_attention)
    AttentionMaskInterface.register("varlen_reference", flash_attention_mask)
    _varlen_reference_attention.segments = []
    settings = dict(lora_dropout=0.0, num_epochs=2, eval_steps=5)
    padded = train(tiny_config(tiny_base, alpaca_file, tmp_path / "padded", packing=False, **settings),
                   loss_sum=padded_loss)
    monkeypatch.setattr("alpaca_lora.train.attention_implementation", lambda device, bf16: "varlen_reference")
    monkeypatch.setattr("alpaca_lora.train.VARLEN_ATTENTION", ("varlen_reference",))
    varlen = train(tiny_config(tiny_base, alpaca_file, tmp_path / "varlen", packing=True, **settings))
    assert varlen.summary.attention == "varlen_reference"
    assert max(_varlen_reference_attention.segments) > 4  # more examples in one row than a micro-batch has rows
    assert losses(varlen.history) == pytest.approx(losses(padded.history), rel=1e-5)
    assert varlen.history[-1]["val_loss"] == pytest.approx(padded.history[-1]["val_loss"], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here; run this on a GPU machine")
def test_flash_attention_one_row_logits_equal_alone(tiny_base, examples):
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        pytest.skip("flash-attn is not installed")
    model = load_model(str(tiny_base), None, True, torch.device("cuda"), "flash_attention_2").eval()
    batch = {k: v.cuda() for k, v in packed_collate([examples], pad_token_id=0).items()}
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example.input_ids.tolist()], device="cuda"), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(example.input_ids)], alone, rtol=0.02, atol=0.02)
            start += len(example.input_ids)


@pytest.mark.parametrize("dtype,cap", [(torch.float32, None), (torch.float32, 30.0), (torch.bfloat16, None)])
def test_the_fused_softmax_cross_entropy_is_the_cross_entropy_and_its_gradient(dtype, cap, monkeypatch):
    """Compiled (as training runs it) and op by op, against autograd through F.cross_entropy: the summed loss
    and d loss / d logits, fill rows (IGNORE_INDEX) adding nothing to the loss."""
    from alpaca_lora.loss import fused_softmax_cross_entropy, soft_capped, softmax_cross_entropy

    monkeypatch.setattr(fused_softmax_cross_entropy, "compile_from", 0)
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(48, 1000, generator=generator)).to(dtype)
    targets = torch.randint(0, 1000, (48,), generator=generator)
    targets[40:] = IGNORE_INDEX  # the filled-up end of a chunk
    reference_logits = logits.float().requires_grad_()
    reference = torch.nn.functional.cross_entropy(soft_capped(reference_logits, cap), targets,
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
    reference.backward()
    for function in (fused_softmax_cross_entropy, softmax_cross_entropy):
        loss_only = function(logits, targets, cap, False)  # evaluation: the logits are left as they are
        gradient = logits.clone()
        loss = function(gradient, targets, cap, True)  # training: they become the gradient
        assert loss.dtype == torch.float32 and loss_only == loss
        torch.testing.assert_close(loss, reference.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(gradient[:40].float(), reference_logits.grad[:40],
                                   **({} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)))
    assert fused_softmax_cross_entropy.compiled is not None  # compiled here, not fallen back


def test_where_torch_compile_fails_the_head_runs_op_by_op_and_says_so():
    from alpaca_lora.compiled import CompiledOrEager
    from alpaca_lora.loss import softmax_cross_entropy

    def no_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")
    fused = CompiledOrEager(softmax_cross_entropy, compile_from=0)
    fused.compiled = no_compiler
    logits, targets = torch.randn(4, 10), torch.tensor([1, 2, 3, IGNORE_INDEX])
    with pytest.warns(UserWarning, match="softmax_cross_entropy runs uncompiled .*InvalidCxxCompiler: no working C"):
        loss = fused(logits.clone(), targets, None, True)
    assert fused.compiled is None
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
