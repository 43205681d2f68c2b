"""SparseGrad with the Hugging Face Trainer: routing, LR schedule, clipping, accumulation, resume, precision,
activation checkpointing, logging and weight decay. Tiny random BERT (hidden 32, 2 layers, dropout 0), in-memory data."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import peft_sparsegrad
import peft_sparsegrad.callback as sg_callback
import peft_sparsegrad.fused as sg_fused
import peft_sparsegrad.update as sg_update
from peft_sparsegrad import SparseGradCallback, SparseGradConfig, SparseGradOptimizer, create_sparsegrad_optimizer
from peft_sparsegrad.optim import SparseState, sparse_step, sparsegrad_parameters

VOCAB, SEQ, KEEP_RATIO = 64, 8, 0.05

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ---------------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is fastest and avoids oversubscribing a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tensors(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A learnable toy task: the label is whether the first token is in the lower half of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    labels = (ids[:, 0] < VOCAB // 2).long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _dataset(n: int = 32, seed: int = 0) -> Dataset:
    return Dataset.from_dict({k: v.tolist() for k, v in _tensors(n, seed).items()})


def _base(seed: int = 0, dtype: torch.dtype | None = None) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    base = BertForSequenceClassification(config)
    return base if dtype is None else base.to(dtype)


def _model(seed: int = 0, *, dtype: torch.dtype | None = None, bases: str = "calibrate", **config_kwargs):
    """The same SparseGrad PeftModel for the same seed: same random base, same calibration batches, same bases."""
    base = _base(seed, dtype)
    data = _tensors(8, seed=1234)
    calibration = [{k: v[i * 4:(i + 1) * 4] for k, v in data.items()} for i in range(2)]
    config = SparseGradConfig(calibration_dataloader=calibration if bases == "calibrate" else None,
                              calibration_steps=2, bases=bases, task_type="SEQ_CLS", modules_to_save=["classifier"],
                              keep_ratio=KEEP_RATIO, **config_kwargs)
    return get_peft_model(base, config)


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                    save_strategy="no", logging_steps=1, per_device_train_batch_size=8, max_steps=6,
                    learning_rate=1e-2, lr_scheduler_type="constant", dataloader_num_workers=0)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def _layers(model) -> list[peft_sparsegrad.SparseGradLayer]:
    return [m for m in model.modules() if isinstance(m, peft_sparsegrad.SparseGradLayer)]


def _deltas(model) -> list[torch.Tensor]:
    """Every ΔW' of the model (trainable or not), dense, in module order."""
    return [m.sparsegrad_delta["default"].to_dense() for m in _layers(model)]


def _weights(model) -> list[torch.Tensor]:
    """Every adapted base weight W (trained in place), float32 copies, in module order."""
    return [m.get_base_layer().weight.detach().float().clone() for m in _layers(model)]


def _base_weights(seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """W₀ of every Linear of a fresh base model (built independently of the adapted one), keyed like the PEFT model."""
    return {"base_model.model." + name: m.weight.detach().clone() for name, m in _base(seed, dtype).named_modules()
            if isinstance(m, torch.nn.Linear)}


def _assert_weights_consistent(model, w0: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """W == W₀ + U_out ΔW' U_inᵀ for every adapted layer, W₀ from a fresh base model (not derived from W or ΔW')."""
    for name, m in model.named_modules():
        if isinstance(m, peft_sparsegrad.SparseGradLayer):
            u_out, u_in = m.sparsegrad_bases["default"].float32()  # float16-stored for half-precision layers
            expected = w0[name].float() + u_out @ m.sparsegrad_delta["default"].to_dense() @ u_in.T
            torch.testing.assert_close(m._true_weight(), expected, atol=atol, rtol=0, msg=name)


def _classifier(model) -> list[torch.Tensor]:
    head = model.base_model.model.classifier.modules_to_save["default"]
    return [head.weight.detach().clone(), head.bias.detach().clone()]


def _assert_close_lists(a, b, atol=0.0, rtol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


def _differs(a, b, tol=1e-7) -> bool:
    return any((x - y).abs().max().item() > tol for x, y in zip(a, b))


def _train(tmp_path, model=None, callbacks=None, trainer_kwargs=None, train_kwargs=None, n_train=32,
           trainer_attrs=None, **args):
    model = _model() if model is None else model
    trainer = Trainer(model=model, args=_args(tmp_path, **args), train_dataset=_dataset(n_train),
                      callbacks=[SparseGradCallback()] if callbacks is None else callbacks, **(trainer_kwargs or {}))
    for name, value in (trainer_attrs or {}).items():
        setattr(trainer, name, value)
    trainer.train(**(train_kwargs or {}))
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# 1. end to end with the plain Trainer + callback


@pytest.mark.parametrize("selection", ["periodic", "dynamic"])
def test_trainer_with_callback_trains(tmp_path, selection):
    model = _model(selection=selection, refresh_interval=5)
    initial = _deltas(model)
    callback = SparseGradCallback()
    trainer = _train(tmp_path, model, callbacks=[callback], max_steps=20, learning_rate=3e-2, n_train=16)
    assert callback.path == "step-in-backward"
    assert not hasattr(model, "sparsegrad_grad_norm_carrier")  # the norm carrier was only there while training
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert _differs(_deltas(model), initial)

    inner = sg_callback._unwrap(trainer.optimizer)
    assert isinstance(inner, torch.optim.AdamW) and not isinstance(inner, SparseGradOptimizer)
    for param, k in sparsegrad_parameters(model):
        state = inner.state[param]
        assert state, "the callback keeps ΔW' state in the Trainer optimizer's state"
        assert set(state) == {"step", "sparsegrad"}  # no dense AdamW moments of the Trainer's optimizer
        assert int(state["step"]) == 20
        st = state["sparsegrad"]
        assert isinstance(st, SparseState) and st.mode == "adamw"
        delta = param.sparsegrad_owner.sparsegrad_delta["default"]
        # lean "adamw" mode: moments only on the support (periodic: the k entries of S), never W-shaped tensors
        if selection == "dynamic":
            assert st.indices is delta.flat
        else:
            assert st.indices.numel() == k and torch.isin(st.indices, delta.flat).all()
        assert st.exp_avg.shape == st.exp_avg_sq.shape == (st.indices.numel(),)
        # the support grew past k but stays within max_support (2 · k by default)
        assert k < delta.nnz <= 2 * k < param.numel()
        assert param.grad is None
    _assert_weights_consistent(model, _base_weights())
    for param in model.base_model.model.classifier.modules_to_save["default"].parameters():
        assert inner.state[param]["exp_avg"].shape == param.shape  # the head trains with the Trainer's AdamW


# ---------------------------------------------------------------------------------------------------------------------
# 2. without the callback: loud failure, never dense training


def test_trainer_without_callback_fails(tmp_path):
    model = _model()
    initial, weights = _deltas(model), _weights(model)
    with pytest.raises(RuntimeError, match="SparseGradCallback"):
        _train(tmp_path, model, callbacks=[])
    _assert_close_lists(_deltas(model), initial)  # nothing was applied
    _assert_close_lists(_weights(model), weights)


def test_trainer_without_callback_fails_after_a_routed_run(tmp_path):
    """The routing mark ends with the callback's run: a later Trainer without it must not train ΔW' densely."""
    model = _model()
    _train(tmp_path / "routed", model, max_steps=2)
    trained, weights = _deltas(model), _weights(model)
    with pytest.raises(RuntimeError, match="SparseGradCallback"):
        _train(tmp_path / "plain", model, callbacks=[], max_steps=2)
    _assert_close_lists(_deltas(model), trained)
    _assert_close_lists(_weights(model), weights)


# ---------------------------------------------------------------------------------------------------------------------
# 3. a SparseGradOptimizer given to the Trainer


def _first_step_changes(tmp_path, make_trainer_kwargs):
    model = _model()
    initial = _deltas(model)
    trainer = _train(tmp_path, model, callbacks=[SparseGradCallback()], trainer_kwargs=make_trainer_kwargs(model),
                     max_steps=1)
    assert isinstance(sg_callback._unwrap(trainer.optimizer), SparseGradOptimizer)
    changed = [int((after != before).sum()) for after, before in zip(_deltas(model), initial)]
    ks = [k for _, k in sparsegrad_parameters(model)]
    assert all(0 < c <= k for c, k in zip(changed, ks)), (changed, ks)
    return trainer


def test_trainer_with_sparsegrad_optimizer(tmp_path):
    # mode "sgd" differs from the config's "adamw": the optimizer's own mode must be used (the callback only logs)
    trainer = _first_step_changes(
        tmp_path, lambda model: {"optimizers": (create_sparsegrad_optimizer(model, lr=1e-2, mode="sgd"), None)})
    opt = sg_callback._unwrap(trainer.optimizer)
    for param, _ in sparsegrad_parameters(trainer.model):
        state = opt.state[param]
        assert set(state) == {"step", "sparsegrad"} and state["step"] == 1  # sgd layout, one step
        assert state["sparsegrad"].mode == "sgd" and state["sparsegrad"].exp_avg is None
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SparseGradCallback))
    assert callback._delegated is opt
    assert 0 < trainer.state.log_history[0]["sparsegrad/kept_energy"] <= 1


def test_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    trainer = _first_step_changes(
        tmp_path, lambda model: {"optimizer_cls_and_kwargs": (SparseGradOptimizer, {"lr": 1e-2, "mode": "adamw"})})
    opt = sg_callback._unwrap(trainer.optimizer)
    sparse_groups = [g for g in opt.param_groups if "sparsegrad_k" in g]
    assert len(sparse_groups) == 4 and all(g["weight_decay"] == 0.0 for g in sparse_groups)


# ---------------------------------------------------------------------------------------------------------------------
# 4. the Trainer's LR schedule and max_grad_norm apply to ΔW'


class _UpdateSizes(TrainerCallback):
    """Norm of the ΔW' change made by each optimizer step."""

    def __init__(self, model):
        self.model, self.sizes = model, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.before = _deltas(self.model)

    def on_step_end(self, args, state, control, **kwargs):
        self.sizes.append(sum((a - b).norm().item() for a, b in zip(_deltas(self.model), self.before)))


def test_lr_schedule_applies_to_sparse_params(tmp_path, monkeypatch):
    lrs = []
    real = sg_callback.apply_update

    def spy(*args, **kwargs):
        lrs.append(kwargs["lr"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sg_callback, "apply_update", spy)
    model = _model()
    sizes = _UpdateSizes(model)
    trainer = _train(tmp_path, model, callbacks=[SparseGradCallback(), sizes], max_steps=8, learning_rate=0.05,
                     warmup_steps=5, lr_scheduler_type="linear")
    per_step = [lrs[i:i + 4] for i in range(0, len(lrs), 4)]
    assert len(per_step) == 8 and all(len(set(s)) == 1 for s in per_step)
    scheduled = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert [s[0] for s in per_step] == pytest.approx(scheduled, abs=1e-12)
    assert per_step[0][0] == 0.0 and per_step[5][0] == pytest.approx(0.05)
    assert sizes.sizes[0] == 0.0  # warmup starts at lr 0: ΔW' does not move
    assert 0 < sizes.sizes[1] < sizes.sizes[4]

    monkeypatch.setattr(sg_callback, "apply_update", real)
    constant, linear = _model(), _model()
    _train(tmp_path, constant, lr_scheduler_type="constant")
    _train(tmp_path, linear, lr_scheduler_type="linear")
    assert _differs(_deltas(constant), _deltas(linear))


def test_max_grad_norm_covers_sparse_params(tmp_path):
    clipped, unclipped = _model(), _model()
    _train(tmp_path, clipped, callbacks=[SparseGradCallback(mode="sgd")], max_grad_norm=1e-6)
    _train(tmp_path, unclipped, callbacks=[SparseGradCallback(mode="sgd")], max_grad_norm=0.0)
    assert _differs(_deltas(clipped), _deltas(unclipped))
    assert max(d.abs().max().item() for d in _deltas(clipped)) < 1e-6  # lr 1e-2 · |g| ≤ 1e-6


@pytest.mark.parametrize("selection", ["periodic", "dynamic"])
def test_trainer_matches_plain_loop_with_global_clipping(tmp_path, selection):
    """Trainer + callback (sgd mode, constant LR, max_grad_norm; the step inside backward) == plain loop on the dense
    path: clip_grad_norm_ over ALL trainable parameters, then the sparse step on ΔW' and torch AdamW on the head. The
    norm carrier makes the Trainer's clipping see the adapted weights exactly as the dense W.grad would."""
    lr, max_norm, steps = 0.05, 0.05, 4
    model = _model(selection=selection, refresh_interval=2)
    trainer = _train(tmp_path, model, callbacks=[SparseGradCallback(mode="sgd")], max_steps=steps,
                     learning_rate=lr, max_grad_norm=max_norm, train_sampling_strategy="sequential")
    norms = [h["grad_norm"] for h in trainer.state.log_history if "loss" in h]
    assert all(n > max_norm for n in norms)  # clipping really acted

    ref = _model(selection=selection, refresh_interval=2)
    ref.train()
    sparse = sparsegrad_parameters(ref)
    head = list(ref.base_model.model.classifier.modules_to_save["default"].parameters())
    adamw = torch.optim.AdamW(head, lr=lr, weight_decay=0.0, fused=True)  # the Trainer's default "adamw_torch_fused"
    for p, _ in sparse:
        p.sparsegrad_routed = True
    states = [{} for _ in sparse]
    data = _tensors(32)
    for step in range(steps):
        batch = {k: v[step * 8:(step + 1) * 8] for k, v in data.items()}
        ref(**batch).loss.backward()
        trainable = [p for p in ref.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        for (p, k), state in zip(sparse, states):
            refresh = p.sparsegrad_owner.sparsegrad_refresh_interval["default"]
            sparse_step(p, p.grad, state, k=k, lr=lr, mode="sgd", refresh_interval=refresh)
            p.grad = None
        adamw.step()
        ref.zero_grad()
    _assert_close_lists(_deltas(model), _deltas(ref), atol=1e-6, rtol=1e-5)
    _assert_close_lists(_weights(model), _weights(ref), atol=1e-6, rtol=1e-5)
    # Adam normalises each entry: an entry with a near-zero gradient amplifies float rounding of the forward pass
    _assert_close_lists(_classifier(model), _classifier(ref), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# 5. gradient accumulation


def test_gradient_accumulation_matches_large_batch_trainer(tmp_path):
    """Batch 4 × 2 accumulation steps == batch 8 (same random order from the seed). Sparse mode "sgd": the update is
    proportional to the gradient, so a wrong loss scale would show (Adam would hide it).

    transformers 5.24 infers from BertForSequenceClassification.forward(**kwargs) that the model normalises its loss by
    ``num_items_in_batch`` and therefore skips the division by ``gradient_accumulation_steps``; the model returns a
    plain mean, so accumulated gradients come out doubled. That happens identically for full fine-tuning without PEFT
    (checked by hand), so it is not SparseGrad's concern: tell the Trainer the truth with ``loss_is_scaled_for_ga``.
    """
    small, large = _model(), _model()
    common = dict(max_steps=4, lr_scheduler_type="linear", learning_rate=0.05,
                  trainer_attrs={"loss_is_scaled_for_ga": False})
    _train(tmp_path / "ga", small, callbacks=[SparseGradCallback(mode="sgd")], per_device_train_batch_size=4,
           gradient_accumulation_steps=2, **common)
    _train(tmp_path / "big", large, callbacks=[SparseGradCallback(mode="sgd")], per_device_train_batch_size=8,
           gradient_accumulation_steps=1, **common)
    assert _differs(_deltas(small), _deltas(_model()))
    _assert_close_lists(_deltas(small), _deltas(large), atol=1e-6, rtol=1e-5)
    _assert_close_lists(_weights(small), _weights(large), atol=1e-6, rtol=1e-5)
    _assert_close_lists(_classifier(small), _classifier(large), atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_matches_large_batch_plain_loop():
    data = _tensors(32)
    results = []
    for micro in (1, 2, 4):
        model = _model()
        model.train()
        opt = create_sparsegrad_optimizer(model, lr=0.05, mode="sgd")
        size = 8 // micro
        for step in range(4):
            for m in range(micro):
                lo = step * 8 + m * size
                batch = {k: v[lo:lo + size] for k, v in data.items()}
                (model(**batch).loss / micro).backward()
            opt.step()
            opt.zero_grad()
        results.append((_deltas(model), _classifier(model), _weights(model)))
    assert _differs(results[0][0], _deltas(_model()))
    for deltas, head, weights in results[1:]:
        _assert_close_lists(deltas, results[0][0], atol=1e-6, rtol=1e-5)
        _assert_close_lists(weights, results[0][2], atol=1e-6, rtol=1e-5)
        _assert_close_lists(head, results[0][1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# 6. checkpoint / resume and the saved adapter


class _RecordStates(TrainerCallback):
    """After every optimizer step: (step, support indices, selected_at) of every adapted weight's sparse state."""

    def __init__(self):
        self.steps: dict[int, list[tuple[torch.Tensor, int]]] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = sg_callback._unwrap(optimizer)
        self.steps[state.global_step] = [
            (inner.state[p]["sparsegrad"].indices.clone(), inner.state[p]["sparsegrad"].selected_at)
            for p, _ in sparsegrad_parameters(model)]


def _saved_sparse_states(checkpoint) -> list[SparseState]:
    """The SparseStates of a checkpoint's optimizer.pt (a weights_only load, as the Trainer's), in parameter order."""
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return [saved[i]["sparsegrad"] for i in sorted(saved) if "sparsegrad" in saved[i]]


@pytest.mark.parametrize("mode", ["adamw", "sparse_adam", "periodic"])
def test_resume_from_checkpoint_is_exact(tmp_path, mode):
    """Resuming reproduces the uninterrupted run; for selection="periodic" the checkpoint falls between
    two refreshes (interval 3, checkpoint after step 5), so the restored fixed supports must be used as they are."""
    kwargs = dict(max_steps=10, save_strategy="steps", save_steps=5, lr_scheduler_type="linear", warmup_steps=2,
                  weight_decay=0.1)
    config = {"selection": "periodic", "refresh_interval": 3} if mode == "periodic" else {"selection": "dynamic"}
    update = "adamw" if mode == "periodic" else mode
    run_a, record_a = _model(**config), _RecordStates()
    _train(tmp_path / "a", run_a, callbacks=[record_a, SparseGradCallback(mode=update)], **kwargs)
    checkpoint = tmp_path / "a" / "checkpoint-5"
    saved = _saved_sparse_states(checkpoint)  # the sparse state is in the Trainer's optimizer.pt
    assert len(saved) == 4 and all(isinstance(st, SparseState) and st.mode == update for st in saved)
    for st in saved:
        assert st.indices.dtype == torch.int32 and st.exp_avg.dtype == torch.float32
        assert st.selected_at == 3 if mode == "periodic" else st.prev_selected is not None

    run_b, record_b = _model(**config), _RecordStates()
    trainer_b = _train(tmp_path / "b", run_b, callbacks=[record_b, SparseGradCallback(mode=update)],
                       train_kwargs={"resume_from_checkpoint": str(checkpoint)}, **kwargs)
    assert trainer_b.state.global_step == 10 and sorted(record_b.steps) == [6, 7, 8, 9, 10]
    # steps 6..10 keep the supports of the uninterrupted run; periodic: step 6 uses the restored S (selected at
    # step 4), 7 and 10 refresh
    for step in range(6, 11):
        for (idx_b, at_b), (idx_a, at_a) in zip(record_b.steps[step], record_a.steps[step]):
            assert torch.equal(idx_b, idx_a), step
            assert at_b == at_a
    if mode == "periodic":
        assert [record_b.steps[s][0][1] for s in range(6, 11)] == [3, 6, 6, 6, 9]
    assert _differs(_deltas(run_a), _deltas(_model(**config)), tol=1e-3)  # the runs moved, so the check means something
    # Equal to float32 rounding: the uninterrupted run updated W incrementally (W += U_out δ U_inᵀ every step), the
    # resumed one rebuilt it once as W₀ + U_out ΔW' U_inᵀ from the loaded ΔW'.
    _assert_close_lists(_deltas(run_b), _deltas(run_a), atol=1e-6, rtol=1e-5)
    _assert_close_lists(_weights(run_b), _weights(run_a), atol=1e-6, rtol=1e-5)
    _assert_close_lists(_classifier(run_b), _classifier(run_a), atol=1e-6, rtol=1e-5)
    _assert_weights_consistent(run_b, _base_weights())
    if update == "adamw":
        opt = sg_callback._unwrap(trainer_b.optimizer)
        for param, k in sparsegrad_parameters(run_b):
            st = opt.state[param]["sparsegrad"]
            assert st.exp_avg.shape != param.shape
            if mode == "periodic":
                assert st.exp_avg.numel() == k


@pytest.mark.parametrize("rounding", ["compensated", "stochastic"])
def test_bf16_model_resumes_with_sparse_state_intact(tmp_path, rounding):
    """A bf16 base model: torch's Optimizer.load_state_dict casts every state tensor of a parameter to its dtype
    (bf16), which would destroy int32 indices (> 256) and float32 moments; the SparseState object is not cast."""
    kwargs = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-2)
    config = dict(dtype=torch.bfloat16, selection="dynamic", rounding=rounding)
    run_a = _model(**config)
    at_checkpoint: list[list[torch.Tensor]] = []

    class AtCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                at_checkpoint.append(_deltas(run_a))

    _train(tmp_path / "a", run_a, callbacks=[AtCheckpoint(), SparseGradCallback()], **kwargs)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = _saved_sparse_states(checkpoint)
    assert len(saved) == 4

    loaded: list[SparseState] = []

    class Capture(TrainerCallback):  # before SparseGradCallback's first resumed step: the state as loaded
        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            if not loaded:
                inner = sg_callback._unwrap(optimizer)
                loaded.extend(copy.deepcopy(inner.state[p]["sparsegrad"]) for p, _ in sparsegrad_parameters(model))

    run_b = _model(**config)
    trainer_b = _train(tmp_path / "b", run_b, callbacks=[Capture(), SparseGradCallback()],
                       train_kwargs={"resume_from_checkpoint": str(checkpoint)}, **kwargs)
    assert trainer_b.state.global_step == 6 and len(loaded) == 4
    for st, ref in zip(loaded, saved):
        assert st.indices.dtype == torch.int32 and st.prev_selected.dtype == torch.int32
        assert st.exp_avg.dtype == st.exp_avg_sq.dtype == torch.float32
        assert st.indices.max() > 256  # not representable in bf16: a cast would have shown
        assert torch.equal(st.indices, ref.indices) and torch.equal(st.prev_selected, ref.prev_selected)
        assert torch.equal(st.exp_avg, ref.exp_avg) and torch.equal(st.exp_avg_sq, ref.exp_avg_sq)
    for layer in _layers(run_b):
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert layer.sparsegrad_delta["default"].values.dtype == torch.float32
    _assert_fp32_sparse_state(trainer_b, run_b)
    # The resumed run continues the uninterrupted one, but not bit-exactly: its W was rebuilt as W₀ + ΔW in one
    # sum (compensated, or rounded to nearest without the uninterrupted run's stochastic-rounding noise), so the bf16
    # W the forward uses may round to the neighbouring value where the incremental run's did not, and a few
    # near-tied top-k selections then differ. It must still be far closer to the uninterrupted run than that run is
    # to its own state at the checkpoint.
    for b, a, c in zip(_deltas(run_b), _deltas(run_a), at_checkpoint[0]):
        assert (b - a).norm() <= 0.3 * (a - c).norm(), ((b - a).norm(), (a - c).norm())
        assert (b - a).norm() <= 0.15 * a.norm(), ((b - a).norm(), a.norm())
    # W₀ + ΔW to the residual's precision (compensated) or to a few bf16 ulps of |W| ≤ 0.2 (stochastic noise)
    _assert_weights_consistent(run_b, _base_weights(dtype=torch.bfloat16),
                               atol=1e-3 if rounding == "compensated" else 4e-3)


def test_save_model_is_loadable(tmp_path):
    model = _model()
    trainer = _train(tmp_path, model)
    trainer.save_model(str(tmp_path / "adapter"))
    batch = _tensors(4, seed=99)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    loaded = PeftModel.from_pretrained(_base(0), str(tmp_path / "adapter"))
    loaded.eval()
    _assert_close_lists(_deltas(loaded), _deltas(model))
    assert _differs(_deltas(loaded), [torch.zeros_like(d) for d in _deltas(model)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(_base(0).eval()(**batch).logits, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# 7. precision


def _assert_fp32_sparse_state(trainer, model):
    """ΔW' and the sparse optimizer state are float32 (indices int32) whatever W's dtype; W is finite."""
    opt = sg_callback._unwrap(trainer.optimizer)
    for param, _ in sparsegrad_parameters(model):
        assert param.dtype == model.base_model.model.classifier.modules_to_save["default"].weight.dtype
        assert torch.isfinite(param).all()
        delta = param.sparsegrad_owner.sparsegrad_delta["default"]
        assert delta.values.dtype == torch.float32 and delta.flat.dtype == torch.int32
        st = opt.state[param]["sparsegrad"]
        assert st.exp_avg.dtype == torch.float32 and st.exp_avg_sq.dtype == torch.float32
        assert st.indices.dtype == torch.int32


def test_bf16_autocast_training(tmp_path):
    model = _model()
    initial = _deltas(model)
    trainer = _train(tmp_path, model, bf16=True)
    assert _differs(_deltas(model), initial)
    _assert_fp32_sparse_state(trainer, model)


def test_bf16_base_model_training(tmp_path):
    model = _model(dtype=torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, peft_sparsegrad.SparseGradLinear))
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert layer.sparsegrad_bases["default"].U_out.dtype == torch.float32
    initial = _deltas(model)
    trainer = _train(tmp_path, model)
    assert _differs(_deltas(model), initial)
    _assert_fp32_sparse_state(trainer, model)


@pytest.mark.parametrize("compute_dtype, expected", [("auto", torch.float32), ("float32", torch.float32),
                                                     ("bfloat16", torch.bfloat16)])
def test_bf16_weights_train_in_each_compute_dtype(tmp_path, monkeypatch, compute_dtype, expected):
    """compute_dtype sets the precision of the step's dense products ("auto" on CPU: float32, as bf16 GEMMs there
    buffer float32 operand copies); the result agrees with float32 products to bf16's resolution (bf16 products may
    swap entries that tie at the top-k threshold)."""
    from peft_sparsegrad.rotation import BasisPair

    seen = set()
    for name in ("rotate_topk", "rotate_at"):
        original = getattr(BasisPair, name)

        def spy(self, grad, *args, _original=original, **kwargs):
            seen.add(args[1] if len(args) > 1 else kwargs.get("dtype"))
            return _original(self, grad, *args, **kwargs)
        monkeypatch.setattr(BasisPair, name, spy)
    model = _model(dtype=torch.bfloat16, compute_dtype=compute_dtype, rounding="compensated")
    assert {m.compute_dtype() for m in _layers(model)} == {expected}
    _train(tmp_path, model, max_steps=3)
    assert seen == {expected}
    reference = _model(dtype=torch.bfloat16, compute_dtype="float32", rounding="compensated")
    monkeypatch.undo()
    _train(tmp_path, reference, max_steps=3)
    for got, want in zip(_deltas(model), _deltas(reference)):  # the same entries (up to near-ties), the same values
        both = (got != 0) & (want != 0)
        assert both.sum() >= 0.9 * (want != 0).sum()
        assert (got[both] - want[both]).norm() <= 0.05 * want[both].norm()


def test_float32_weights_compute_in_float32_by_default():
    assert {m.compute_dtype() for m in _layers(_model())} == {torch.float32}


def test_fp16_training(tmp_path):
    model = _model()
    initial = _deltas(model)
    try:
        trainer = _train(tmp_path, model, fp16=True)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        if "SparseGrad" in str(exc):
            raise
        pytest.skip(f"fp16 mixed precision is not supported on CPU here: {type(exc).__name__}: {exc}")
    assert trainer.accelerator.mixed_precision == "fp16"
    assert _differs(_deltas(model), initial)
    _assert_fp32_sparse_state(trainer, model)


# ---------------------------------------------------------------------------------------------------------------------
# 8. activation (gradient) checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_matches(tmp_path, monkeypatch, use_reentrant):
    """``gradient_checkpointing`` is the deprecated alias of ``activation_checkpointing`` in transformers 5."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    real = modeling_utils.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    plain, checkpointed = _model(), _model()
    _train(tmp_path / "plain", plain, max_steps=3)
    assert not calls
    trainer = _train(tmp_path / "ckpt", checkpointed, max_steps=3, activation_checkpointing=True,
                     activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert calls and set(calls) == {use_reentrant}  # every layer really ran checkpointed, in the requested flavour
    if use_reentrant:  # transformers makes the embedding output require grad, else reentrant blocks get no gradient
        assert trainer.model.base_model.model._require_grads_hooks
    assert _differs(_deltas(plain), _deltas(_model()))
    _assert_close_lists(_deltas(checkpointed), _deltas(plain), atol=1e-6, rtol=1e-5)
    _assert_close_lists(_classifier(checkpointed), _classifier(plain), atol=1e-6, rtol=1e-5)


def test_reentrant_checkpointing_gradients_plain_loop():
    """ΔW' gradients under reentrant recomputation equal the plain ones, provided the checkpointed blocks' input
    requires grad (enable_input_require_grads); without it reentrant checkpointing drops them (torch's limitation,
    the same for every adapter method)."""
    batch = _tensors(8)

    def grads(model):
        model.train()
        for p, _ in sparsegrad_parameters(model):
            p.sparsegrad_routed = True
        model(**batch).loss.backward()
        return [p.grad for p, _ in sparsegrad_parameters(model)]

    expected = grads(_model())
    assert all(g is not None and g.abs().sum() > 0 for g in expected)

    model = _model()
    bert = model.base_model.model
    bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    bert.disable_input_require_grads()
    assert all(g is None for g in grads(model))  # the limitation

    model = _model()
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert model.base_model.model._require_grads_hooks
    _assert_close_lists(grads(model), expected, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 9. statistics in the Trainer's logs


def test_statistics_in_log_history(tmp_path):
    trainer = _train(tmp_path, _model(selection="dynamic"), max_steps=4)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    for entry in logged:
        assert 0 < entry["sparsegrad/kept_energy"] <= 1
        assert 0 <= entry["sparsegrad/overlap"] <= 1
    assert logged[0]["sparsegrad/overlap"] == 0  # nothing was selected before the first step
    # ΔW''s support over Σk: k entries after the first step, then the union of the selections grows (to at most
    # max_support = 2 by default)
    support = [entry["sparsegrad/support"] for entry in logged]
    assert support[0] == 1.0 and all(b >= a for a, b in zip(support, support[1:])) and 1.0 < support[-1] <= 2.0


# ---------------------------------------------------------------------------------------------------------------------
# 10. the Trainer's weight decay never reaches ΔW' densely


@pytest.mark.parametrize("mode", ["adamw", "sparse_adam"])
def test_trainer_weight_decay_does_not_touch_adapted_weights(tmp_path, monkeypatch, mode):
    """The Trainer's weight_decay (its AdamW) never reaches the adapted weights: ΔW' is non-zero only on entries
    some step selected, W stays exactly W₀ + U_out ΔW' U_inᵀ (a dense decay of W would break that), and the Trainer's
    AdamW holds no dense moments for W. The head does get the Trainer's update."""
    selections: list[tuple[object, torch.Tensor]] = []
    real = sg_update.gradient_of

    def spy(layer, *args, **kwargs):
        sparse = real(layer, *args, **kwargs)
        selections.append((layer, sparse.flat.clone()))
        return sparse

    monkeypatch.setattr(sg_fused, "gradient_of", spy)
    model = _model(selection="dynamic", max_support=None)
    params = sparsegrad_parameters(model)
    head_before = _classifier(model)
    trainer = _train(tmp_path, model, callbacks=[SparseGradCallback(mode=mode)], weight_decay=0.1, max_steps=5,
                     learning_rate=1e-2)
    assert len(selections) == 5 * len(params)  # one selection per adapted weight and step
    inner = sg_callback._unwrap(trainer.optimizer)
    for param, k in params:
        mask = torch.zeros(param.numel(), dtype=torch.bool)
        for idx in [idx for layer, idx in selections if layer is param.sparsegrad_owner]:
            mask[idx] = True
        assert k <= int(mask.sum()) < param.numel()
        delta = param.sparsegrad_owner.sparsegrad_delta["default"]
        assert delta.flat.long().tolist() == mask.nonzero().squeeze(1).tolist()  # the support: selected entries
        flat = delta.to_dense().view(-1)
        assert (flat[~mask] == 0).all()
        assert (flat[mask] != 0).any()
        assert "exp_avg" not in inner.state[param]
    _assert_weights_consistent(model, _base_weights())
    assert _differs(_classifier(model), head_before)


# ---------------------------------------------------------------------------------------------------------------------
# 11. bases calibrated from the Trainer's own data


def test_calibration_from_the_trainers_dataloader(tmp_path):
    """A config with calibration_steps but neither data nor bases: the adapter waits for its bases, and the callback
    computes them at on_train_begin from the Trainer's first batches; they equal peft_sparsegrad.calibrate on those
    same batches. Calibration leaves the weights as they were; then training moves ΔW'."""
    w0 = _base_weights()
    config = SparseGradConfig(calibration_steps=2, task_type="SEQ_CLS", modules_to_save=["classifier"],
                              keep_ratio=KEEP_RATIO)
    model = get_peft_model(_base(0), config)
    assert all(m.sparsegrad_bases["default"] is None for m in _layers(model))
    assert set(model.base_model.pending_bases().values()) == {m.sparsegrad_type["default"] for m in _layers(model)}

    first_step: list[tuple[list, list]] = []

    class Before(TrainerCallback):  # after calibration, before the first optimizer step
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                first_step.append((_weights(model), [m.sparsegrad_bases["default"] for m in _layers(model)]))

    _train(tmp_path, model, callbacks=[SparseGradCallback(), Before()], max_steps=3,
           train_sampling_strategy="sequential")
    assert model.base_model.pending_bases() == {}
    weights_before, bases_before = first_step[0]
    assert all(b is not None for b in bases_before)
    for layer, w in zip(_layers(model), weights_before):
        name = next(n for n, m in model.named_modules() if m is layer)
        assert torch.equal(w, w0[name])  # calibration did not change W

    data = _tensors(32)
    batches = [{k: v[i * 8:(i + 1) * 8] for k, v in data.items()} for i in range(2)]  # sequential order, batch 8
    reference = peft_sparsegrad.calibrate(_base(0), SparseGradConfig(calibration_steps=2, task_type="SEQ_CLS"),
                                          batches, progress=False)
    for layer in _layers(model):
        pair = layer.sparsegrad_bases["default"]
        ref = reference.pairs[layer.sparsegrad_type["default"]]
        for u, u_ref in ((pair.U_out, ref.U_out), (pair.U_in, ref.U_in)):
            # trained with float16-stored bases (the default): the reference's values to float16 rounding
            assert u.dtype == torch.float16 and u.shape == u_ref.shape == (u.shape[0], u.shape[0])
            u = u.float()
            torch.testing.assert_close(u.T @ u, torch.eye(u.shape[0]), atol=2e-3, rtol=0)
            torch.testing.assert_close(u, u_ref, atol=1e-3, rtol=0)
        assert (pair.U_out.shape[0], pair.U_in.shape[0]) == (layer.out_features, layer.in_features)
        assert layer.sparsegrad_delta["default"].nnz > 0
    assert _differs(_deltas(model), [torch.zeros_like(d) for d in _deltas(model)])
    _assert_weights_consistent(model, w0)
