"""Shared test helpers: thread limits for tiny models, and official-format DINOv2 checkpoints built from our models."""
import pytest, torch


@pytest.fixture
def one_thread():
    "Tiny models: one torch thread avoids oversubscribing a shared CPU (restored afterwards)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def to_official(bb, seed=1):
    "Our backbone -> DINOv2's official names and layout (CLS row in pos_embed, register_tokens, mask_token)."
    sd = {k: v.detach().clone() for k, v in bb.vit.state_dict().items()}
    pos0 = 0.02 * torch.randn(1, 1, bb.embed_dim, generator=torch.Generator().manual_seed(seed))
    off = dict(cls_token=sd.pop('cls_token') - pos0, pos_embed=torch.cat([pos0, sd.pop('pos_embed')], 1),
               mask_token=bb.mask_token.detach().clone())
    if 'reg_token' in sd: off['register_tokens'] = sd.pop('reg_token')
    return off | sd
