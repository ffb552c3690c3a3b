"""Each method selects exactly the parameters of docs/design.md's "Parameter sets" table, on SD1.x's block structure."""

import pytest
from diffusers.models.attention_processor import Attention

from esd.errors import EsdError
from esd.selection import select_parameters, trainable_names
from esd.tiny import tiny_sd1_layout_unet, tiny_unet


@pytest.fixture(scope="module")
def unet():
    return tiny_sd1_layout_unet()


def _params_of(unet, predicate) -> set[str]:
    """Parameter names of the modules matching `predicate(name, module)`, found from the module tree."""
    names = set()
    for mod_name, module in unet.named_modules():
        if mod_name and predicate(mod_name, module):
            names |= {f"{mod_name}.{p}" for p, _ in module.named_parameters()}
    return names


def test_xattn_is_every_cross_attention_module(unet):
    cross = _params_of(unet, lambda n, m: isinstance(m, Attention) and m.is_cross_attention)
    assert set(trainable_names(unet, "xattn")) == cross
    assert len(cross) == 16 * 5  # SD1.x: 16 transformer blocks x (q, k, v, out.weight, out.bias)


def test_selfattn_is_every_self_attention_module(unet):
    self_attn = _params_of(unet, lambda n, m: isinstance(m, Attention) and not m.is_cross_attention)
    assert set(trainable_names(unet, "selfattn")) == self_attn
    assert len(self_attn) == 80


def test_noxattn_excludes_cross_attention_time_embedding_and_output_head(unet):
    everything = {n for n, _ in unet.named_parameters()}
    cross = set(trainable_names(unet, "xattn"))
    time_and_head = _params_of(unet, lambda n, m: n in ("time_embedding", "conv_norm_out", "conv_out"))
    assert len(time_and_head) == 8
    assert set(trainable_names(unet, "noxattn")) == everything - cross - time_and_head
    assert set(trainable_names(unet, "notime")) == everything - time_and_head
    assert set(trainable_names(unet, "full")) == everything
    # the resnets' own time projections are trained by ESD-u (only the top-level embedding is frozen)
    assert any("time_emb_proj" in n for n in trainable_names(unet, "noxattn"))


def test_layer_methods_pick_the_ldm_blocks_of_the_2023_code(unet):
    # LDM output_blocks.6/.8 = diffusers up_blocks.2.attentions.0/.2 ; input_blocks.4/.7 = down_blocks.1/.2.attentions.0
    xlayer = trainable_names(unet, "xlayer")
    assert {n.split(".transformer_blocks")[0] for n in xlayer} == {"up_blocks.2.attentions.0", "up_blocks.2.attentions.2"}
    assert all(".attn2." in n for n in xlayer) and len(xlayer) == 10
    selflayer = trainable_names(unet, "selflayer")
    assert {n.split(".transformer_blocks")[0] for n in selflayer} == {"down_blocks.1.attentions.0",
                                                                       "down_blocks.2.attentions.0"}
    assert all(".attn1." in n for n in selflayer) and len(selflayer) == 10


def test_x_strict_is_only_cross_attention_keys_and_values(unet):
    names = trainable_names(unet, "x-strict")
    assert len(names) == 32
    assert {n.rsplit(".", 2)[-2] for n in names} == {"to_k", "to_v"}


@pytest.mark.parametrize(("alias", "method"), [("esd-x", "xattn"), ("esd-u", "noxattn"), ("esd-all", "full"),
                                               ("esd-x-strict", "x-strict")])
def test_aliases(unet, alias, method):
    assert trainable_names(unet, alias) == trainable_names(unet, method)


def test_select_freezes_everything_else(unet):
    selected = select_parameters(unet, "xattn")
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(selected)


def test_a_method_that_selects_nothing_is_an_error():
    small = tiny_unet()  # two levels only: there is no up_blocks.2
    with pytest.raises(EsdError, match="selects no parameter"):
        trainable_names(small, "xlayer")
    with pytest.raises(EsdError, match="unknown method"):
        trainable_names(small, "xatn")
