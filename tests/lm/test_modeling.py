"""sdm_hf.lm.modeling.disable_dropout on modules and on attention's functional dropout."""

import torch

from sdm_hf.lm import disable_dropout
from tests.helpers import tiny_causal_lm, tiny_tokenizer


def test_every_dropout_probability_becomes_zero_and_the_config_is_kept():
    model = tiny_causal_lm(tiny_tokenizer(), attention_dropout=0.3)
    attention = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    assert attention and all(m.attention_dropout == 0.3 for m in attention)
    assert disable_dropout(model) is model
    assert all(m.attention_dropout == 0.0 for m in attention)
    assert model.config.attention_dropout == 0.3


def test_dropout_modules_and_plain_attributes():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)
            self.hidden_dropout = 0.1
            self.dropout = True  # not a probability: left alone

    net = torch.nn.Sequential(Block(), torch.nn.Dropout(0.2))
    disable_dropout(net)
    assert net[0].drop.p == 0.0 and net[1].p == 0.0 and net[0].hidden_dropout == 0.0
    assert net[0].dropout is True
    x = torch.randn(4, 3)
    net.train()
    torch.testing.assert_close(net[1](x), x)  # training mode, yet nothing is dropped
