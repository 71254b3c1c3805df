"""Two CPU processes (gloo) train a few steps with DDP; both ranks end with identical weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

WORKER = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from fapecli.execution.compact import create_model
    from fapecli.training.config import load_config
    from fapecli.training.loop import train

    images, out, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = load_config("tiny", [f"data.clean_dirs=['{images}']", f"out_dir='{out}'",
                               "device=cpu", "threads=1", "schedule.steps=3",
                               "schedule.ckpt_every=0", "schedule.val_every=0",
                               "loss.adv_start=1", "logging.progress=none"])
    torch.manual_seed(1234 + rank)  # different init per rank: DDP must broadcast rank 0's
    model = create_model("fape-tiny")
    result = train(cfg, model=model, emit=lambda s: None)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    Path = __import__("pathlib").Path
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"hash": h.hexdigest(), "step": result.step, "reports": result.reports}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    from PIL import Image
    from skimage import data

    images = tmp_path / "img"
    images.mkdir()
    for i, im in enumerate([data.astronaut(), data.chelsea(), data.coffee()]):
        Image.fromarray(np.ascontiguousarray(im[::6, ::6])).save(images / f"{i}.png")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(images), str(out), str(rank)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers timed out")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    import json

    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["step"] == r1["step"] == 3
    assert "2 process(es)" in r0["reports"][-1]
    assert r0["hash"] == r1["hash"]
    assert (out / "final" / "model.safetensors").is_file()  # written once, by rank 0
