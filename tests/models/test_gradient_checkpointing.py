"""Gradient checkpointing: the same losses and gradients as the plain model, fewer tensors kept for the backward."""
import pytest
import torch

from minillm.models import DecoderOnlyModel, EncoderOnlyModel

CFG = {"d_model": 32, "num_heads": 4, "num_layers": 3, "max_seq_len": 40, "vocab_size": 50}


def loss_grads_and_saved(model, batch, seed):
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.compute_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_same_loss_and_gradients_with_fewer_saved_activations(kind, dropout):
    torch.manual_seed(0)
    if kind == "decoder":
        model = DecoderOnlyModel({"model_type": "decoder_only", **CFG, "dropout": dropout})
    else:
        model = EncoderOnlyModel({"model_type": "encoder_only", **CFG, "dropout": dropout})
    model.train()
    ids = torch.randint(0, 50, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 30:] = 0  # padding: the packed path of the encoder too
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loss, grads, saved = loss_grads_and_saved(model, batch, seed=5)
    model.gradient_checkpointing_enable()
    loss_ck, grads_ck, saved_ck = loss_grads_and_saved(model, batch, seed=5)
    torch.testing.assert_close(loss_ck, loss, rtol=1e-6, atol=1e-6)  # dropout replays its random state
    assert grads.keys() == grads_ck.keys()
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert saved_ck < saved / 2, (saved_ck, saved)  # only the blocks' inputs are kept
    model.gradient_checkpointing_disable()
    assert loss_grads_and_saved(model, batch, seed=5)[2] == saved
    model.gradient_checkpointing_enable()
    model.eval()  # inference and decoding do not checkpoint
    with torch.no_grad():
        torch.testing.assert_close(model.compute_loss(batch), model.compute_loss(batch))
