"""DeepSpeed ZeRO-2/3 training through Lightning on CPU (``segrouter.training.deepspeed_cpu``).

DeepSpeed and ``torch.distributed`` keep process-global state (the DeepSpeed accelerator is fixed at import, a
process group lives until the process ends), so every training runs in a fresh subprocess. The subprocess is this
file run as a script (see ``_main``): Lightning relaunches that same command for each extra rank when
``devices=2``. Each rank saves its results to ``result_rank<r>.pt``; rank 0 also saves a ZeRO checkpoint
directory and consolidates it into ``consolidated.pt``. Trainings are cached per module, so the training and
checkpoint tests share runs.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from segrouter.errors import SegrouterError
from segrouter.training.deepspeed_cpu import make_deepspeed_strategy

MAX_STEPS = 3
RUN_TIMEOUT_S = 180
# Adam moves every parameter with a non-zero gradient by about lr per step; bf16 rounding is far below this.
MIN_UPDATE = 5e-3

Result = dict[str, Any]


class TinyRegressor(pl.LightningModule):
    """A 2-layer MLP fitting random targets, recording each step's loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y.float())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 8, generator=generator), torch.randn(64, 1, generator=generator))
        return DataLoader(data, batch_size=8)


def _main() -> None:
    """Train once and write results to ``--out`` (the subprocess entry point)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--precision", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--offload", action="store_true", help="offload optimizer (and stage-3 parameters) to CPU")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    pl.seed_everything(0)
    model = TinyRegressor()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    strategy = make_deepspeed_strategy(
        args.stage,
        accelerator="cpu",
        offload_optimizer=args.offload,
        offload_parameters=args.offload and args.stage == 3,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=MAX_STEPS,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model)

    import deepspeed  # only after make_deepspeed_strategy, which sets DS_ACCELERATOR before the first import
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    # ZeRO-3 partitions parameters across ranks; gather them (a no-op for ZeRO-2) to read the full values.
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        final = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    result = {"strategy": type(strategy).__name__, "losses": model.losses, "initial": initial, "final": final}
    torch.save(result, args.out / f"result_rank{trainer.global_rank}.pt")

    trainer.save_checkpoint(args.out / "ckpt")
    if trainer.is_global_zero:
        convert_zero_checkpoint_to_fp32_state_dict(args.out / "ckpt", args.out / "consolidated.pt")
    trainer.strategy.barrier()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _train_in_subprocess(out: Path, *, stage: int, precision: str, devices: int, offload: bool) -> list[Result]:
    """Run ``_main`` in a fresh process group; return each rank's result, rank 0 first."""
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"}}
    env.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1"
    )
    cmd = [sys.executable, __file__, f"--stage={stage}", f"--precision={precision}", f"--devices={devices}"]
    proc = subprocess.Popen(
        [*cmd, *(["--offload"] if offload else []), f"--out={out}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a timeout also ends the ranks Lightning launched
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"training timed out after {RUN_TIMEOUT_S} s:\n{output[-5000:]}")
    assert proc.returncode == 0, f"training failed (exit {proc.returncode}):\n{output[-5000:]}"
    return [torch.load(out / f"result_rank{rank}.pt", weights_only=True) for rank in range(devices)]


@pytest.fixture(scope="module")
def train(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[list[Result], Path]]:
    """``train(stage, precision, devices, offload)`` -> (results per rank, output directory), each run done once."""
    cache: dict[tuple[int, str, int, bool], tuple[list[Result], Path]] = {}

    def run(
        stage: int, precision: str = "32-true", devices: int = 1, offload: bool = False
    ) -> tuple[list[Result], Path]:
        key = (stage, precision, devices, offload)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"zero{stage}-{precision}-{devices}dev{'-offload' * offload}")
            results = _train_in_subprocess(out, stage=stage, precision=precision, devices=devices, offload=offload)
            cache[key] = results, out
        return cache[key]

    return run


def _assert_trained(result: Result) -> None:
    assert result["strategy"] == "CPUDeepSpeedStrategy"
    assert len(result["losses"]) == MAX_STEPS
    assert all(math.isfinite(loss) for loss in result["losses"]), result["losses"]
    assert result["initial"].keys() == result["final"].keys()
    for name, before in result["initial"].items():
        update = (result["final"][name] - before.float()).abs().max().item()
        assert update > MIN_UPDATE, f"{name} barely changed ({update:.2e})"


def _assert_consolidated(out: Path, final: dict[str, torch.Tensor]) -> None:
    assert (out / "ckpt").is_dir(), "DeepSpeed saves a checkpoint directory"
    checkpoint = torch.load(out / "consolidated.pt", weights_only=True)
    state = checkpoint["state_dict"]
    assert state.keys() == final.keys()
    for name, value in final.items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=f"consolidated {name} differs")


@pytest.mark.parametrize(
    ("stage", "precision", "offload"),
    [(2, "32-true", False), (3, "32-true", False), (2, "bf16-mixed", False), (3, "32-true", True)],
    ids=["zero2", "zero3", "zero2-bf16", "zero3-offload"],
)
def test_zero_trains_on_cpu(
    train: Callable[..., tuple[list[Result], Path]], stage: int, precision: str, offload: bool
) -> None:
    (result,), _ = train(stage, precision, offload=offload)
    _assert_trained(result)


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_zero_checkpoint_consolidates_to_one_file(
    train: Callable[..., tuple[list[Result], Path]], stage: int
) -> None:
    (result,), out = train(stage)
    _assert_consolidated(out, result["final"])


def test_zero2_two_processes(train: Callable[..., tuple[list[Result], Path]]) -> None:
    results, out = train(2, devices=2)
    for result in results:
        _assert_trained(result)
    # Ranks see different batches but ZeRO-2 keeps every rank's parameters in sync.
    assert results[0]["losses"] != results[1]["losses"]
    for name, value in results[0]["final"].items():
        torch.testing.assert_close(results[1]["final"][name], value, rtol=0, atol=0)
    _assert_consolidated(out, results[0]["final"])


@pytest.mark.parametrize("stage", [0, 1, 4])
def test_make_deepspeed_strategy_rejects_other_stages(stage: int) -> None:
    with pytest.raises(SegrouterError, match="use one of 2, 3"):
        make_deepspeed_strategy(stage)


def test_make_deepspeed_strategy_names_fix_without_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    with pytest.raises(SegrouterError, match="pip install") as excinfo:
        make_deepspeed_strategy(2, accelerator="cpu")
    assert "\n" not in str(excinfo.value)


if __name__ == "__main__":
    _main()
