"""The SR upsampling shared by training data and inference."""

from __future__ import annotations

import numpy as np
import torch
from skimage import data

from fapecli.execution.compact import prepare_input
from fapecli.planning.plan import Plan
from fapecli.resample import upsample, upsample_tensor
from fapecli.training import degrade as D


def test_upsample_keeps_range_dtype_and_channel_axis() -> None:
    edge = np.zeros((8, 8, 1), np.float32)
    edge[:, 4:] = 1.0  # a hard edge: Lanczos overshoots, the result must still be in [0, 1]
    out = upsample(edge, (24, 24))
    assert out.shape == (24, 24, 1) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[:, :8].max() < 0.05 and out[:, -8:].min() > 0.95
    u8 = upsample((edge[..., 0] * 255).astype(np.uint8), (16, 16))
    assert u8.dtype == np.uint8 and u8.shape == (16, 16)
    flat = np.full((5, 7, 3), 0.3, np.float32)
    np.testing.assert_allclose(upsample(flat, (15, 21)), 0.3, atol=1e-6)
    assert upsample(flat, (5, 7)) is flat


def test_upsample_tensor_is_the_numpy_upsample_per_frame() -> None:
    batch = torch.rand(2, 3, 6, 5)
    out = upsample_tensor(batch.half(), 3)
    assert out.shape == (2, 3, 18, 15) and out.dtype == torch.float16
    want = upsample(batch[1].half().float().permute(1, 2, 0).numpy(), (18, 15))
    np.testing.assert_allclose(out[1].float().permute(1, 2, 0).numpy(), want, atol=1e-3)


def test_training_inputs_match_inference_inputs() -> None:
    """`add_lowres(keep_size=True)` gives the executor exactly what `prepare_input` gives it."""
    hr = data.astronaut()[:96, :120].astype(np.float32) / 255
    lr = D.bicubic_downscale(hr, 4)
    kept, _ = D.add_lowres(hr, 0, 4, keep_size=True)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None]
    seen = prepare_input(x, Plan(task="sr", band="high", scale=4))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(kept, seen, atol=1e-6)
