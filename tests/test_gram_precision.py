"""``gram_precision="bf16"``: bfloat16 Gram products, float32 sums and eigh. Checks that it is validated, that its bases
are orthogonal and agree with the float64 path where the eigenvectors are well determined, that they concentrate
held-out gradient energy as well, and that it works through get_peft_model, calibrate and save/load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_sparsegrad.bases as bases_module
import peft_sparsegrad.calibration as calibration_module
from conftest import batch_stream, build_model, logits
from peft_sparsegrad import SparseGradConfig, calibrate, create_sparsegrad_optimizer
from peft_sparsegrad.bases import BasisPair, GramAccumulator


def _kronecker_gradients(out: int, inn: int, n: int, seed: int, decay: float) -> list[torch.Tensor]:
    """G = L diag(σ)^½ Z diag(τ)^½ Rᵀ with Z iid normal, σ_i = i^-decay, τ_j = j^-decay and fixed random orthogonal L, R:
    gradients whose Grams have eigenvectors L, R and a decaying spectrum, like real MLP gradients. The first ``n`` come
    from one draw of L, R; call again with the same seed for more of the same distribution."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(inn, inn, generator=gen, dtype=torch.float64))[0]
    s_out = torch.arange(1, out + 1, dtype=torch.float64).pow(-decay).sqrt()
    s_in = torch.arange(1, inn + 1, dtype=torch.float64).pow(-decay).sqrt()
    return [(left @ (s_out[:, None] * torch.randn(out, inn, generator=gen, dtype=torch.float64) * s_in) @ right.T)
            .float() for _ in range(n)]


def _top_share(pair: BasisPair, grads: list[torch.Tensor], ratio: float = 0.01) -> float:
    """Share of Σ ‖G‖² that the top ``ratio`` entries of the rotated gradients U_outᵀ G U_in hold (what one SparseGrad
    step keeps)."""
    top = total = 0.0
    for g in grads:
        energy = (pair.U_out.double().T @ g.double() @ pair.U_in.double()).flatten().square()
        top += energy.topk(max(1, int(ratio * energy.numel()))).values.sum().item()
        total += energy.sum().item()
    return top / total


def _bases(grads: list[torch.Tensor], precision: str):
    acc = GramAccumulator(*grads[0].shape, precision=precision)
    for g in grads:
        acc.add(g)
    return acc.bases()


def test_invalid_gram_precision_is_rejected():
    with pytest.raises(ValueError, match=r"gram_precision must be 'fp32' or 'bf16', got 'fp16'"):
        SparseGradConfig(gram_precision="fp16")
    with pytest.raises(ValueError, match=r"one of \('fp32', 'bf16'\)"):
        GramAccumulator(4, 3, precision="bfloat16")
    assert SparseGradConfig().gram_precision == "fp32"


def test_dtypes_of_both_precisions():
    g = torch.randn(6, 5)
    for precision, sum_dtype in (("fp32", torch.float64), ("bf16", torch.float32)):
        acc = GramAccumulator(6, 5, precision=precision)
        acc.add(g)
        pair, (s_out, s_in) = acc.bases()
        assert acc.gram_out.dtype == acc.gram_in.dtype == sum_dtype
        assert s_out.dtype == s_in.dtype == sum_dtype  # eigh ran in the sum dtype
        assert pair.U_out.dtype == pair.U_in.dtype == torch.float32
        assert pair.U_out.mT.is_contiguous() and pair.U_in.mT.is_contiguous()  # column-major, as BasisPair stores


@pytest.mark.parametrize("precision,tol", [("bf16", 2e-2), ("fp32", 1e-6)])
def test_lower_triangle_matches_float64_gram_across_row_blocks(monkeypatch, precision, tol):
    """Several row blocks, the last one ragged: the accumulated lower triangle is Σ G Gᵀ (Σ Gᵀ G) to the precision's
    accuracy, and nothing above the diagonal blocks is touched (eigh reads only the lower triangle)."""
    monkeypatch.setattr(bases_module, "_GRAM_BLOCK", 7)
    grads = _kronecker_gradients(30, 17, 4, seed=3, decay=1.0)
    acc = GramAccumulator(30, 17, precision=precision)
    for g in grads:
        acc.add(g)
    ref_out = sum(g.double() @ g.double().T for g in grads)
    ref_in = sum(g.double().T @ g.double() for g in grads)
    for got, ref in ((acc.gram_out, ref_out), (acc.gram_in, ref_in)):
        err = (got.double().tril() - ref.tril()).abs().max().item()
        assert err < tol * ref.abs().max().item(), err  # bfloat16 inputs and products: ~2⁻⁸ relative each
        n = ref.shape[0]
        beyond_diagonal_blocks = torch.ones(n, n, dtype=torch.bool).triu(1)
        for start in range(0, n, 7):
            beyond_diagonal_blocks[start:start + 7, :min(start + 7, n)] = False
        assert not got[beyond_diagonal_blocks].any()
    _, (s_out, s_in) = acc.bases()  # eigh of the lower triangle: the spectrum of the float64 Gram matrices
    for eigs, ref in ((s_out, ref_out), (s_in, ref_in)):
        torch.testing.assert_close(eigs[:5].double(), torch.linalg.eigvalsh(ref).flip(0)[:5], rtol=tol, atol=0)


@pytest.mark.parametrize("shape", [(192, 96), (96, 192)])
@pytest.mark.parametrize("decay", [1.0, 1.5])
def test_bf16_bases_orthogonal_agree_and_concentrate_like_fp32(shape, decay):
    """30 calibration gradients, 10 held out. Measured over 6 seeds × these 4 cases: bf16 bases orthogonal to ≤ 2.2e-6,
    the top-4 eigenvectors |cos| > 0.999999 against the fp32 path (relative eigengaps ≥ 0.016), and the held-out top-1 %
    energy shares (0.50-0.86) differing by ≤ 4.4e-4. The bounds below leave a margin of ~2.3-4.5×."""
    grads = _kronecker_gradients(*shape, 40, seed=0, decay=decay)
    calib, held_out = grads[:30], grads[30:]
    (pair32, (s_out32, s_in32)), (pair16, _) = _bases(calib, "fp32"), _bases(calib, "bf16")
    for u16, u32, eigs in ((pair16.U_out, pair32.U_out, s_out32), (pair16.U_in, pair32.U_in, s_in32)):
        eye = torch.eye(u16.shape[0], dtype=torch.float64)
        assert (u16.double().T @ u16.double() - eye).abs().max().item() < 1e-5
        gaps = (eigs[:4] - eigs[1:5]) / eigs[0]
        assert (gaps > 0.01).all(), gaps  # the leading four are well separated, so the columns are determined
        cos = (u16[:, :4].double() * u32[:, :4].double()).sum(0).abs()
        assert (cos > 0.999).all(), cos
    share32, share16 = _top_share(pair32, held_out), _top_share(pair16, held_out)
    assert share32 > 0.4  # the rotation concentrates energy at all (identity bases: 0.11-0.15)
    assert abs(share16 - share32) < 1e-3, (share16, share32)


@pytest.fixture
def precisions_seen(monkeypatch) -> list[str]:
    """The precision of every GramAccumulator calibration creates."""
    seen: list[str] = []

    class Spy(GramAccumulator):
        def __init__(self, *args, precision: str = "fp32", **kwargs) -> None:
            seen.append(precision)
            super().__init__(*args, precision=precision, **kwargs)

    monkeypatch.setattr(calibration_module, "GramAccumulator", Spy)
    return seen


def test_calibrate_passes_gram_precision_and_tensorly_ignores_it(precisions_seen):
    seen = precisions_seen
    model = build_model("bert")
    bf16 = calibrate(model, SparseGradConfig(calibration_steps=2, gram_precision="bf16"),
                     batch_stream("bert", seed=11), progress=False)
    assert seen == ["bf16", "bf16"]  # one accumulator per layer type
    assert all(e.dtype == torch.float32 for pair in bf16.eigenvalues.values() for e in pair)
    seen.clear()
    calibrate(model, SparseGradConfig(calibration_steps=2, basis_method="tensorly", gram_precision="bf16"),
              batch_stream("bert", seed=11), progress=False)
    assert seen == []  # tensorly stacks the gradients; no Gram matrices at all


def test_get_peft_model_bf16_trains_saves_and_loads(tmp_path):
    config = SparseGradConfig(task_type="SEQ_CLS", calibration_steps=2, gram_precision="bf16",
                              calibration_dataloader=batch_stream("bert", seed=21))
    model = get_peft_model(build_model("bert"), config)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    for batch in batch_stream("bert", seed=5, n=2):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    batch = next(batch_stream("bert", seed=99))
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["gram_precision"] == "bf16"
    loaded = PeftModel.from_pretrained(build_model("bert"), tmp_path)
    assert loaded.peft_config["default"].gram_precision == "bf16"
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)


def test_get_peft_model_calibrates_with_gram_precision(precisions_seen):
    seen = precisions_seen
    get_peft_model(build_model("bert"), SparseGradConfig(task_type="SEQ_CLS", calibration_steps=2,
                                                         gram_precision="bf16",
                                                         calibration_dataloader=batch_stream("bert", seed=21)))
    assert seen == ["bf16", "bf16"]


def test_cli_gram_precision_flag():
    from peft_sparsegrad.cli import build_parser

    parser = build_parser()
    for command in (["calibrate", "--task", "sst2", "--output", "b.safetensors"], ["finetune", "--output-dir", "o"]):
        assert parser.parse_args(command).gram_precision == "fp32"
        assert parser.parse_args([*command, "--gram-precision", "bf16"]).gram_precision == "bf16"
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--gram-precision", "fp16"])
