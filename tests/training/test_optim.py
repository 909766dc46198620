"""minillm.training.optim: the Trainer's AdamW and its clipped step against torch's separate clip and step."""
import pytest
import torch

from minillm.models import DecoderOnlyModel
from minillm.training.optim import clip_grad_norm_and_step, make_adamw


def _model(seed=0):
    torch.manual_seed(seed)
    return DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": 40, "d_model": 16, "num_heads": 2,
                             "num_layers": 1, "max_seq_len": 8, "dropout": 0.0})


def test_adamw_is_fused_on_cpu_and_decays_matrices_only():
    torch.manual_seed(0)
    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": 40, "d_model": 16, "num_heads": 2,
                              "num_layers": 1, "max_seq_len": 8, "dropout": 0.0})
    twin = DecoderOnlyModel(model.config)
    twin.load_state_dict(model.state_dict())
    ours = make_adamw(model, 1e-2, 0.1, (0.9, 0.95))
    assert ours.defaults["fused"] and [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in ours.param_groups[0]["params"])
    assert all(p.dim() < 2 for p in ours.param_groups[1]["params"])
    ref = torch.optim.AdamW([{"params": [p for p in twin.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in twin.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), foreach=False)
    ids = torch.randint(0, 40, (2, 8))
    for _ in range(3):
        for m, opt in ((model, ours), (twin, ref)):
            m(ids, labels=ids)[1].backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # Adam divides by sqrt(v): near-zero gradients
        # turn rounding into differences of a small fraction of lr (1e-2)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["clipping", "not-clipping"])
def test_clipped_step_equals_clip_grad_norm_then_step(max_norm):
    """The clip coefficient applied inside fused AdamW's pass gives the weights of clip_grad_norm_ + step (up to
    rounding: 1/coef divides instead of coef multiplying) and returns the same total norm, whether the norm is
    clipped (1e-3, far below it) or not."""
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    ours_model, ref_model = _model(), _model()
    ours, ref = make_adamw(ours_model, 1e-2), make_adamw(ref_model, 1e-2)
    assert ours.defaults["fused"]
    moved = False
    for _ in range(4):
        norms = []
        for m, opt in ((ours_model, ours), (ref_model, ref)):
            m(ids, labels=ids)[1].backward()
            if opt is ours:
                norms.append(clip_grad_norm_and_step(opt, m.parameters(), max_norm))
            else:
                norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm))
                opt.step()
            opt.zero_grad()
        torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)
        assert not hasattr(ours, "grad_scale")  # the divisor does not outlive the step
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(a, _model().state_dict()[name])
    assert moved


def test_clipped_step_scales_gradients_by_the_clip_coefficient():
    """Adam's first step hardly depends on the gradients' scale, so check the divisor itself: the fused kernel
    unscales the gradients it reads in place (as for GradScaler), so after the step they are the gradients
    multiplied by the clip coefficient."""
    model = _model()
    opt = make_adamw(model, 0.0)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids)[1].backward()
    before = [p.grad.clone() for p in model.parameters()]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in before]))
    clip_grad_norm_and_step(opt, model.parameters(), 0.5 * float(total))
    coef = 0.5 * float(total) / (float(total) + 1e-6)
    for g0, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad, g0 * coef, rtol=1e-5, atol=1e-8)


def test_clipped_step_falls_back_for_other_optimizers_and_a_set_grad_scale():
    """A non-fused optimizer clips and steps as torch does, exactly; an optimizer whose grad_scale someone else
    set (GradScaler does, for fused optimizers) keeps it and is clipped separately."""
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(3))
    a, b = _model(), _model()
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, foreach=False)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False)
    for m in (a, b):
        m(ids, labels=ids)[1].backward()
    clip_grad_norm_and_step(oa, a.parameters(), 1e-3)
    torch.nn.utils.clip_grad_norm_(b.parameters(), 1e-3)
    ob.step()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)

    c = _model()
    oc = make_adamw(c, 1e-2)
    c(ids, labels=ids)[1].backward()
    oc.grad_scale = torch.tensor(1.0)
    clip_grad_norm_and_step(oc, c.parameters(), 1e-3)
    assert torch.equal(oc.grad_scale, torch.tensor(1.0))
