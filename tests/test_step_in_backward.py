"""The step inside backward (peft_sparsegrad.fused) and the bounded support: the same updates as the dense path (with
clipping and accumulation), one dense gradient alive at a time, clear errors, and max_support / rounding options.
Tiny random BERT and in-memory data from test_training."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

import peft_sparsegrad.fused as sg_fused
from peft_sparsegrad import SparseGradCallback, SparseGradConfig, create_sparsegrad_optimizer
from peft_sparsegrad.fused import NORM_CARRIER
from peft_sparsegrad.optim import sparsegrad_parameters
from test_training import (_assert_close_lists, _assert_weights_consistent, _base_weights, _classifier, _deltas,
                           _differs, _layers, _model, _tensors, _train, _weights)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Norms(TrainerCallback):
    def __init__(self):
        self.norms = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.norms.append(logs["grad_norm"])


def _run(tmp_path, fused: bool, selection: str, **kwargs):
    model = _model(selection=selection, refresh_interval=3)
    callback, norms = SparseGradCallback(step_in_backward=fused), _Norms()
    _train(tmp_path / ("fused" if fused else "dense"), model, callbacks=[callback, norms],
           train_sampling_strategy="sequential", **kwargs)
    assert callback.path == ("step-in-backward" if fused else "dense")
    return model, norms.norms


# ---- 1. the same training as the dense path ---------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["periodic", "dynamic"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_trainer_step_in_backward_equals_the_dense_path(tmp_path, selection, max_grad_norm):
    """Same ΔW', W, head and logged grad_norm, with clipping off and with clipping acting on every step: the norm
    carrier gives the Trainer's clip_grad_norm_ exactly the adapted weights' ||G||, and its coefficient reaches the
    kept values."""
    common = dict(max_steps=7, learning_rate=0.05, max_grad_norm=max_grad_norm)
    fused, norms_fused = _run(tmp_path, True, selection, **common)
    dense, norms_dense = _run(tmp_path, False, selection, **common)
    assert _differs(_deltas(fused), _deltas(_model(selection=selection)))
    _assert_close_lists(_deltas(fused), _deltas(dense), atol=1e-6, rtol=1e-5)
    _assert_close_lists(_weights(fused), _weights(dense), atol=1e-6, rtol=1e-5)
    _assert_close_lists(_classifier(fused), _classifier(dense), atol=1e-5, rtol=1e-4)
    assert len(norms_fused) == len(norms_dense) == 7
    assert norms_fused == pytest.approx(norms_dense, rel=1e-4)
    if max_grad_norm:
        assert min(norms_fused) > max_grad_norm  # clipping acted on every step
    _assert_weights_consistent(fused, _base_weights())


def test_only_one_dense_gradient_is_alive_during_backward(tmp_path, monkeypatch):
    """Each adapted weight's gradient half runs as soon as its W.grad is complete and frees it: whenever it runs, no
    other adapted weight holds a gradient (on the dense path all of them would, until the optimizer step)."""
    alive: list[int] = []
    real = sg_fused.gradient_of

    def spy(layer, adapter, grad, *args, **kwargs):
        alive.append(sum(p.grad is not None for p, _ in sparsegrad_parameters(model)))
        return real(layer, adapter, grad, *args, **kwargs)

    monkeypatch.setattr(sg_fused, "gradient_of", spy)
    model = _model(selection="dynamic")
    seen_after_backward: list[list] = []

    class AfterBackward(TrainerCallback):  # between backward and the optimizer step
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen_after_backward.append([p.grad for p, _ in sparsegrad_parameters(model)])
            assert hasattr(model, NORM_CARRIER) and getattr(model, NORM_CARRIER).grad is not None

    _train(tmp_path, model, callbacks=[AfterBackward(), SparseGradCallback()], max_steps=3)
    assert alive == [1] * (3 * 4)  # 4 adapted weights, 3 steps: always just the weight being processed
    assert all(g is None for grads in seen_after_backward for g in grads)
    assert NORM_CARRIER not in dict(model.named_parameters())  # removed when training ended


def test_plain_loop_step_in_backward_equals_dense_path_with_clipping():
    """create_sparsegrad_optimizer(step_in_backward=True) + clip_grad_norm_(model.parameters()) in a plain loop ==
    the dense path with the same clipping; W.grad is None right after backward."""
    data, results = _tensors(32), []
    for fused in (True, False):
        model = _model(selection="periodic", refresh_interval=2)
        model.train()
        opt = create_sparsegrad_optimizer(model, lr=0.05, step_in_backward=fused)
        assert opt.step_in_backward == fused and hasattr(model, NORM_CARRIER) == fused
        norms = []
        for step in range(5):
            model(**{k: v[step * 6:(step + 1) * 6] for k, v in data.items()}).loss.backward()
            if fused:
                assert all(p.grad is None for p, _ in sparsegrad_parameters(model))
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
            opt.step()
            opt.zero_grad()
        results.append((_deltas(model), _weights(model), _classifier(model), norms))
        opt.disable_step_in_backward()
        assert not hasattr(model, NORM_CARRIER)
    (d_f, w_f, h_f, n_f), (d_d, w_d, h_d, n_d) = results
    assert min(n_d) > 0.05 and n_f == pytest.approx(n_d, rel=1e-4)
    _assert_close_lists(d_f, d_d, atol=1e-6, rtol=1e-5)
    _assert_close_lists(w_f, w_d, atol=1e-6, rtol=1e-5)
    _assert_close_lists(h_f, h_d, atol=1e-5, rtol=1e-4)


# ---- 2. gradient accumulation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["periodic", "dynamic"])
def test_accumulation_inside_backward_equals_the_dense_path(tmp_path, selection):
    """Batch 4 × 2 accumulation steps: periodic selection adds g[S] of the micro-batches between refreshes (refresh
    interval 3: steps 1, 4, 7 select from the accumulated dense gradient), dynamic selection keeps W.grad dense until
    the last micro-batch. Without clipping both equal the dense path (mode sgd: a wrong scale would show)."""
    common = dict(max_steps=6, learning_rate=0.05, max_grad_norm=0.0, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, trainer_attrs={"loss_is_scaled_for_ga": False})
    models = []
    for fused in (True, False):
        model = _model(selection=selection, refresh_interval=3)
        callback = SparseGradCallback(mode="sgd", step_in_backward=fused)
        _train(tmp_path / str(fused), model, callbacks=[callback], train_sampling_strategy="sequential", **common)
        models.append(model)
    assert _differs(_deltas(models[0]), _deltas(_model(selection=selection)))
    _assert_close_lists(_deltas(models[0]), _deltas(models[1]), atol=1e-6, rtol=1e-5)
    _assert_close_lists(_weights(models[0]), _weights(models[1]), atol=1e-6, rtol=1e-5)


def test_accumulated_periodic_steps_clip_by_the_norm_on_the_support(tmp_path):
    """Between refreshes with accumulation the dense sum of the micro-batches' gradients is never formed: the adapted
    weights enter the clipping norm with ||Σ g[S]|| (≤ ||Σ G||), so the logged norm is smaller there than on the
    dense path, and equal on refresh steps (the accumulated dense gradient is there)."""
    common = dict(max_steps=4, learning_rate=0.05, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  trainer_attrs={"loss_is_scaled_for_ga": False})
    _, fused = _run(tmp_path, True, "periodic", **common)
    _, dense = _run(tmp_path, False, "periodic", **common)
    # refresh_interval 3: steps 1 and 4 refresh, steps 2 and 3 train on the fixed support
    assert fused[0] == pytest.approx(dense[0], rel=1e-4) and fused[3] == pytest.approx(dense[3], rel=1e-4)
    assert fused[1] < dense[1] and fused[2] < dense[2]


def test_plain_loop_dynamic_accumulation_needs_accumulation_steps():
    data = _tensors(16)
    batches = [{k: v[i * 4:(i + 1) * 4] for k, v in data.items()} for i in range(4)]
    model = _model(selection="dynamic")
    model.train()
    opt = create_sparsegrad_optimizer(model, lr=0.05, mode="sgd", step_in_backward=True)
    model(**batches[0]).loss.backward()
    with pytest.raises(RuntimeError, match="accumulation_steps=N"):
        model(**batches[1]).loss.backward()
    opt.disable_step_in_backward()

    results = []
    for fused in (True, False):
        model = _model(selection="dynamic")
        model.train()
        opt = create_sparsegrad_optimizer(model, lr=0.05, mode="sgd", step_in_backward=fused,
                                          **({"accumulation_steps": 2} if fused else {}))
        for step in range(2):
            for micro in range(2):
                (model(**batches[2 * step + micro]).loss / 2).backward()
            opt.step()
            opt.zero_grad()
        results.append((_deltas(model), _weights(model)))
    _assert_close_lists(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    _assert_close_lists(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)


# ---- 3. where it cannot run, and bad values -----------------------------------------------------------------------


def test_fp16_loss_scaling_falls_back_to_the_dense_path():
    assert sg_fused.fused_unavailable_reason(fp16_scaler=True) is not None
    assert sg_fused.fused_unavailable_reason() is None  # a single process, no loss scaling


def test_step_in_backward_errors():
    model = _model()
    with pytest.raises(TypeError, match="step_in_backward"):
        create_sparsegrad_optimizer(model, step_in_backward="yes")
    with pytest.raises(ValueError, match="accumulation_steps"):
        create_sparsegrad_optimizer(model, step_in_backward=True, accumulation_steps=0)
    with pytest.raises(ValueError, match="only matters with step_in_backward=True"):
        create_sparsegrad_optimizer(model, accumulation_steps=2)
    with pytest.raises(TypeError, match="step_in_backward"):
        SparseGradCallback(step_in_backward=1)
    opt = create_sparsegrad_optimizer(model, step_in_backward=True)
    with pytest.raises(ValueError, match="one SparseGrad optimizer per model"):
        create_sparsegrad_optimizer(model, step_in_backward=True)
    opt.disable_step_in_backward()
    assert not hasattr(model, NORM_CARRIER)


# ---- 4. the bounded support and the rounding option -----------------------------------------------------------------


@pytest.mark.parametrize("selection", ["dynamic", "periodic"])
@pytest.mark.parametrize("max_support", [1.0, 1.5, None])
def test_support_never_exceeds_max_support(tmp_path, selection, max_support):
    """ΔW' holds at most ⌈max_support · k⌉ entries however long training runs (None: unbounded, the dynamic
    support grows past it); once full, selections pick among its entries, and training still moves ΔW'."""
    model = _model(selection=selection, refresh_interval=2, max_support=max_support)
    caps = [None if max_support is None else math.ceil(max_support * m.sparsegrad_k["default"])
            for m in _layers(model)]
    sizes: list[list[int]] = []

    class Sizes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sizes.append([m.sparsegrad_delta["default"].nnz for m in _layers(model)])

    _train(tmp_path, model, callbacks=[Sizes(), SparseGradCallback()], max_steps=12)
    for step in sizes:
        for nnz, cap, layer in zip(step, caps, _layers(model)):
            assert nnz >= layer.sparsegrad_k["default"]
            if cap is not None:
                assert nnz <= cap
    last = sizes[-1]
    if max_support is None and selection == "dynamic":
        assert all(nnz > 1.5 * m.sparsegrad_k["default"] for nnz, m in zip(last, _layers(model)))
    if max_support == 1.0:
        assert last == [m.sparsegrad_k["default"] for m in _layers(model)]  # the first selection, kept
    _assert_weights_consistent(model, _base_weights())


def test_config_errors_for_the_new_options():
    with pytest.raises(ValueError, match="max_support must be >= 1"):
        SparseGradConfig(max_support=0.5)
    with pytest.raises(ValueError, match="max_support must be >= 1"):
        SparseGradConfig(max_support=float("nan"))
    with pytest.raises(TypeError, match="max_support must be a number"):
        SparseGradConfig(max_support=True)
    with pytest.raises(ValueError, match="rounding must be one of"):
        SparseGradConfig(rounding="nearest")
    assert SparseGradConfig().selection == "periodic"
    assert SparseGradConfig(sparse_optimizer="sparse_adam").selection == "dynamic"
    with pytest.raises(ValueError, match="selection='periodic' fixes the support"):
        SparseGradConfig(sparse_optimizer="sparse_adam", selection="periodic")


def test_bf16_compensated_rounding_keeps_a_residual_and_stochastic_none(tmp_path):
    for rounding in ("stochastic", "compensated"):
        model = _model(dtype=torch.bfloat16, rounding=rounding)
        _train(tmp_path / rounding, model, max_steps=2)
        for layer in _layers(model):
            if rounding == "compensated":
                assert layer._residual is not None and layer._residual.dtype == torch.bfloat16
            else:
                assert layer._residual is None


def test_engines_it_cannot_serve_are_refused_by_name(tmp_path):
    """DeepSpeed, FSDP1 and CPU offload raise a ValueError naming what is supported (never a silent dense run)."""
    from types import SimpleNamespace

    from peft_sparsegrad.callback import check_engine

    model = _model()
    for args, what in ((SimpleNamespace(deepspeed="ds.json"), "DeepSpeed"),
                       (SimpleNamespace(fsdp=["full_shard", "offload"], fsdp_config={}), "CPU offload"),
                       (SimpleNamespace(fsdp=["full_shard"], fsdp_config={"offload_params": True}), "CPU offload")):
        with pytest.raises(ValueError, match=f"{what}.*supports one process, DDP, or FSDP2"):
            check_engine(args, model)
    check_engine(SimpleNamespace(fsdp=["full_shard"], fsdp_config={"fsdp_version": 2}), model)  # FSDP2: fine
    check_engine(SimpleNamespace(), model)
