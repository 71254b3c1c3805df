from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fapecli.execution.moe import (
    HIGH,
    LOW,
    FrequencyAwareLoRAMoE,
    collect_moe_layers,
    gaussian_kernel,
    inject_lora_moe,
    moe_regulariser,
    plan_context,
    routing_heatmap,
    routing_maps,
    routing_summary,
    set_plan_tokens,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randomise_experts(m: FrequencyAwareLoRAMoE, std: float = 0.1) -> None:
    with torch.no_grad():
        for b in m.lora_B:
            b.normal_(0, std)


def test_gaussian_kernel_defaults() -> None:
    g = gaussian_kernel()
    assert g.numel() == 9 and torch.isclose(g.sum(), torch.tensor(1.0))
    assert torch.allclose(g, g.flip(0))
    assert g.argmax() == 4
    with pytest.raises(ValueError):
        gaussian_kernel(8)


def test_shapes_linear_and_conv() -> None:
    lin = FrequencyAwareLoRAMoE(nn.Linear(12, 20), (8, 16), cond_dim=6)
    assert lin(torch.randn(2, 30, 12)).shape == (2, 30, 20)
    assert lin(torch.randn(30, 12)).shape == (30, 20)
    assert lin(torch.randn(2, 3, 30, 12)).shape == (2, 3, 30, 20)
    assert lin.text_mode == "pad" and lin.freq_mode == "1d"
    conv = FrequencyAwareLoRAMoE(nn.Conv2d(8, 5, 1), (8, 8), cond_dim=6)
    assert conv(torch.randn(2, 8, 11, 13)).shape == (2, 5, 11, 13)
    assert conv.text_mode == "broadcast" and conv.freq_mode == "2d"
    raster = FrequencyAwareLoRAMoE(nn.Conv2d(8, 5, 1), freq_mode="1d", text_mode="pad",
                                   cond_dim=6)
    assert raster(torch.randn(1, 8, 7, 9), torch.randn(1, 4, 6)).shape == (1, 5, 7, 9)
    with pytest.raises(ValueError):
        FrequencyAwareLoRAMoE(nn.Conv2d(8, 5, 3))
    with pytest.raises(ValueError):
        FrequencyAwareLoRAMoE(nn.Linear(4, 4), freq_mode="2d")


@pytest.mark.parametrize("base", [nn.Linear(16, 24), nn.Conv2d(16, 24, 1)])
def test_fresh_wrapper_equals_base(base: nn.Module) -> None:
    m = FrequencyAwareLoRAMoE(base, cond_dim=8)
    x = torch.randn(2, 40, 16) if isinstance(base, nn.Linear) else torch.randn(2, 16, 9, 10)
    tokens = torch.randn(2, 4, 8)
    torch.testing.assert_close(m(x, tokens), base(x), rtol=0, atol=0)
    m.train()
    torch.testing.assert_close(m(x, tokens), base(x), rtol=0, atol=0)


def test_fir_router_follows_spectrum_linear() -> None:
    m = FrequencyAwareLoRAMoE(nn.Linear(8, 8))
    n = torch.arange(128, dtype=torch.float32)
    v = torch.randn(8)
    smooth = torch.sin(2 * math.pi * n / 64)[:, None] * v + 0.5 * v
    alternating = ((-1.0) ** n)[:, None] * v
    g_smooth = m.route(smooth[None])["g_freq"]
    g_alt = m.route(alternating[None])["g_freq"]
    assert g_smooth.shape == (1, 128, 2)
    assert (g_smooth[..., LOW] > 0.9).all()
    assert (g_alt[:, 4:-4, HIGH] > 0.9).all()  # replicate padding softens the two ends
    torch.testing.assert_close(g_smooth.sum(-1), torch.ones(1, 128))


@pytest.mark.parametrize("mode", ["1d", "2d"])
def test_fir_router_follows_spectrum_conv(mode: str) -> None:
    m = FrequencyAwareLoRAMoE(nn.Conv2d(4, 4, 1), freq_mode=mode)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = (1 + 0.3 * torch.sin(xx / 8) * torch.cos(yy / 8))[None, None].repeat(1, 4, 1, 1)
    checker = ((-1.0) ** (xx + yy))[None, None].repeat(1, 4, 1, 1)
    assert m.route(smooth)["g_freq"][..., LOW].mean() > 0.9
    assert m.route(checker)["g_freq"][..., HIGH].mean() > 0.9
    out = m(checker)
    assert out.shape == checker.shape
    assert m.choice_map().shape == (1, 32, 32) and m.choice_map().float().mean() > 0.9


def _text_only(m: FrequencyAwareLoRAMoE) -> None:
    """Make the router decide by the plan: text weight large, spectral weight tiny."""
    with torch.no_grad():
        m.gate_raw.copy_(torch.tensor([5.0, -8.0]))


def test_text_router_follows_plan_token_set() -> None:
    m = FrequencyAwareLoRAMoE(nn.Linear(6, 6), cond_dim=4, text_mode="broadcast")
    with torch.no_grad():
        m.text_router.weight.zero_()
        m.text_router.bias.zero_()
        m.text_router.weight[LOW, 0] = 4.0
        m.text_router.weight[HIGH, 1] = 4.0
    _text_only(m)
    low_plan = torch.tensor([[[1.0, 0, 0, 0]]])
    high_plan = torch.tensor([[[0, 1.0, 0, 0]]])
    x = torch.randn(1, 20, 6)
    assert (m.route(x, low_plan)["g_text"][..., LOW] > 0.95).all()
    assert (m.route(x, high_plan)["index"] == HIGH).all()
    assert (m.route(x, low_plan)["index"] == LOW).all()


def test_text_router_pad_mode_pads_with_zero_tokens() -> None:
    m = FrequencyAwareLoRAMoE(nn.Linear(6, 6), cond_dim=4, text_mode="pad")
    with torch.no_grad():
        m.text_router.weight.zero_()
        m.text_router.weight[HIGH, 0] = 6.0
        m.text_router.bias.zero_()
    tokens = torch.tensor([[[1.0, 0, 0, 0]] * 3])  # M = 3 plan tokens
    g_text = m.route(torch.randn(1, 10, 6), tokens)["g_text"]
    assert g_text.shape == (1, 10, 2)
    assert (g_text[0, :3, HIGH] > 0.99).all()
    torch.testing.assert_close(g_text[0, 3:], torch.full((7, 2), 0.5))  # zero pad: bias only
    long_plan = torch.randn(1, 25, 4)  # longer than N: truncated
    assert m.route(torch.randn(1, 10, 6), long_plan)["g_text"].shape == (1, 10, 2)


def test_text_router_learns_plan_tokens() -> None:
    m = FrequencyAwareLoRAMoE(nn.Linear(6, 6), cond_dim=8)
    plans = torch.randn(2, 4, 8)
    target = torch.tensor([LOW, HIGH])
    opt = torch.optim.Adam(m.text_router.parameters(), lr=0.1)
    x = torch.randn(2, 16, 6)
    for _ in range(200):
        g_text = m.route(x, plans)["g_text"]  # (2, 16, 2); first 4 tokens carry the plan
        loss = -torch.log(g_text[torch.arange(2), :4, target]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    g_text = m.route(x, plans)["g_text"]
    assert g_text[0, :4, LOW].min() > 0.9 and g_text[1, :4, HIGH].min() > 0.9


def test_gradients_reach_experts_and_routers_not_frozen_base() -> None:
    m = FrequencyAwareLoRAMoE(nn.Linear(8, 8), cond_dim=4).train()
    _randomise_experts(m)
    x = torch.randn(2, 64, 8)
    x[0] = torch.linspace(0, 1, 64)[:, None]  # batch 0 smooth (low expert), batch 1 noise (high)
    m(x, torch.randn(2, 4, 4)).square().sum().backward()
    assert m.base.weight.grad is None and not m.base.weight.requires_grad
    for p in (*m.lora_A, *m.lora_B, m.text_router.weight, m.gate_raw):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert set(m.choice_map().unique().tolist()) == {LOW, HIGH}


def test_trainable_base_when_asked() -> None:
    m = FrequencyAwareLoRAMoE(nn.Conv2d(4, 4, 1), freeze_base=False).train()
    m(torch.randn(1, 4, 6, 6)).sum().backward()
    assert m.base.weight.grad is not None


def test_straight_through_top1() -> None:
    m = FrequencyAwareLoRAMoE(nn.Linear(8, 8), cond_dim=4)
    _randomise_experts(m, 1.0)
    x, tokens = torch.randn(2, 32, 8), torch.randn(2, 4, 4)
    hard = m.eval()(x, tokens)
    rt = m.route(x, tokens)
    c = torch.nn.functional.one_hot(rt["index"], 2).float()
    manual = m.base(x) + sum(
        c[..., e : e + 1] * m._expert(e, rt["x_low" if e == LOW else "x_high"]) for e in (0, 1)
    )
    torch.testing.assert_close(hard, manual, rtol=1e-5, atol=1e-5)
    soft = m.train()(x, tokens)  # forward is still one-hot ...
    torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-5)
    soft.sum().backward()  # ... but the gate logits get gradient
    assert m.gate_raw.grad.abs().sum() > 0
    assert m.text_router.weight.grad.abs().sum() > 0


def test_frequency_regulariser() -> None:
    m = FrequencyAwareLoRAMoE(nn.Linear(8, 8)).train()
    with torch.no_grad():
        m.lora_B[LOW].normal_()
    const = torch.ones(1, 50, 8) * torch.randn(8)  # constant tokens: all energy in the low band
    m(const)
    assert m.frequency_regulariser().item() < 1e-10  # low output flat, high output zero
    with torch.no_grad():
        m.lora_B[HIGH].normal_()
    m(torch.randn(1, 50, 8))
    reg = m.frequency_regulariser()
    assert reg.item() > 1e-3 and reg.requires_grad
    reg.backward()
    assert m.lora_B[LOW].grad.abs().sum() > 0
    with torch.no_grad():  # nothing is kept under no_grad
        m(torch.randn(1, 50, 8))
    assert m.frequency_regulariser().item() == 0.0


def test_frequency_regulariser_penalises_out_of_band() -> None:
    m = FrequencyAwareLoRAMoE(nn.Conv2d(4, 4, 1), freq_mode="2d").train()
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    smooth = torch.sin(xx / 6)[None, None].repeat(1, 4, 1, 1)
    rough = ((-1.0) ** (xx + yy))[None, None].repeat(1, 4, 1, 1)
    m._last = {"y_low": smooth, "y_high": rough}
    in_band = m.frequency_regulariser().item()
    m._last = {"y_low": rough, "y_high": smooth}
    out_of_band = m.frequency_regulariser().item()
    assert out_of_band > 20 * in_band


def test_routing_stats() -> None:
    m = FrequencyAwareLoRAMoE(nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        m(torch.randn(2, 4, 8, 8))
        stats = m.routing_stats()
        assert stats["tokens"] == 128
        assert math.isclose(stats["low"] + stats["high"], 1.0)
        m(torch.randn(1, 4, 8, 8))
    assert m.routing_stats(cumulative=True)["tokens"] == 192
    m.reset_routing_stats()
    assert m.routing_stats(cumulative=True)["tokens"] == 0


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.to_out = nn.ModuleList([nn.Linear(d, d), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        a = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1) @ v
        return self.to_out[1](self.to_out[0](a))


class _Transformer(nn.Module):
    def __init__(self, d: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Attention(d) for _ in range(depth)])
        self.ff = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.ff(x)


def test_inject_into_transformer_by_name() -> None:
    model = _Transformer()
    x = torch.randn(2, 24, 16)
    before = model(x)
    names = inject_lora_moe(model, ["to_q", "to_k", "to_v", "to_out.0"], ranks=(8, 16),
                            cond_dim=8)
    assert len(names) == 8 and "blocks.0.to_out.0" in names and "ff" not in names
    layers = collect_moe_layers(model)
    assert list(layers) == names
    assert not isinstance(model.ff, FrequencyAwareLoRAMoE)
    assert model.blocks[0].to_q.weight is model.blocks[0].to_q.base.weight  # for inspecting code
    assert inject_lora_moe(model, ["to_q"]) == []  # wrapped layers are not wrapped again
    with plan_context(model, torch.randn(2, 4, 8)):
        torch.testing.assert_close(model(x), before)
        assert all(m.plan_tokens is not None for m in layers.values())
    assert all(m.plan_tokens is None for m in layers.values())

    model.train()
    for m in layers.values():
        _randomise_experts(m)
    set_plan_tokens(model, torch.randn(1, 4, 8))  # batch 1 plan broadcast to the batch
    loss = model(x).square().mean() + 1e-3 * moe_regulariser(model)
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("base" not in n for n in trainable if n.startswith("blocks"))
    summary = routing_summary(model)
    assert math.isclose(sum(summary["overall"].values()), 1.0)
    assert summary["tokens"] == 8 * 2 * 24
    assert set(routing_maps(model)) == set(names)


def test_inject_by_predicate_and_pattern() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 3, 1))
    assert inject_lora_moe(model, lambda n, m: n == "2") == ["2"]
    assert inject_lora_moe(model, "[0-9]") == ["1"]  # the 3x3 conv is not wrappable
    assert model(torch.randn(1, 3, 10, 10)).shape == (1, 3, 10, 10)


def test_routing_heatmap_for_explain() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.PixelUnshuffle(2), nn.Conv2d(16, 16, 1))
    inject_lora_moe(model)
    assert routing_heatmap(model, (8, 8)) is None
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8))
    heat = routing_heatmap(model, (8, 8))
    assert heat.shape == (2, 8, 8) and heat.min() >= 0 and heat.max() <= 1
