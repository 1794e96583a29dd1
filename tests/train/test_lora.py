import torch

from medvl.train.lora import add_lora, merge_lora


class TinyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.down_proj = torch.nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.q_proj(x)))


def test_merged_weights_give_the_adapted_outputs():
    torch.manual_seed(0)
    plain, adapted = TinyBlock(), TinyBlock()
    adapted.load_state_dict(plain.state_dict())
    add_lora(adapted, r=2, alpha=4, dropout=0.0)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter matter
            torch.nn.init.normal_(p)
    adapted.eval()
    merged = merge_lora(adapted.state_dict(), r=2, alpha=4)
    assert not any("lora" in k or "base_layer" in k for k in merged)
    plain.load_state_dict(merged, strict=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(plain(x), adapted(x))
