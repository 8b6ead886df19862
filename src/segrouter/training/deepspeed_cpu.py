"""DeepSpeed ZeRO-2/3 through Lightning on CPU-only machines, so DeepSpeed recipes run in CPU tests.

On a CUDA machine :func:`make_deepspeed_strategy` returns Lightning's stock
:class:`~lightning.pytorch.strategies.DeepSpeedStrategy`. Without CUDA (or with ``accelerator="cpu"``) it returns
:class:`CPUDeepSpeedStrategy`, which lifts the few CUDA-only assumptions Lightning makes and runs DeepSpeed with its
CPU accelerator (``DS_ACCELERATOR=cpu``) over the ``gloo`` process group.

What works on CPU: ZeRO stages 2 and 3 with ``devices=1`` or ``devices=2`` (one process per device, ``gloo``),
precision ``"32-true"`` and ``"bf16-mixed"``, optimizer and parameter offload, ``trainer.predict``,
``trainer.save_checkpoint`` (a directory, sharded per rank) and its consolidation into one file with
:func:`lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict`.

Limitations on CPU:

* Use a torch optimizer from ``configure_optimizers``, not an ``"optimizer"`` section in the DeepSpeed config:
  DeepSpeed's ``FusedAdam``/``DeepSpeedCPUAdam`` are C++ extensions compiled just in time (needs a compiler, and
  takes minutes). Lightning already sets ``zero_allow_untested_optimizer``; this strategy also defaults
  ``zero_force_ds_cpu_optimizer`` to ``False`` so that offload keeps the torch optimizer.
* ``"16-mixed"``/``"16-true"`` fail ("Type fp16 is not supported on your device"): DeepSpeed's CPU accelerator
  allows fp16 only where oneDNN has fp16 kernels (CPUs with AVX512-FP16/AMX-FP16).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from typing_extensions import override

from segrouter.errors import SegrouterError

__all__ = ["VALID_STAGES", "CPUDeepSpeedStrategy", "make_deepspeed_strategy"]

VALID_STAGES = (2, 3)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's :class:`DeepSpeedStrategy` on the CPU accelerator.

    Requires ``DS_ACCELERATOR=cpu`` in the environment before ``deepspeed`` is first imported (see
    :func:`make_deepspeed_strategy`). Takes the same keyword arguments as :class:`DeepSpeedStrategy`.

    Overrides, each lifting one CUDA-only assumption of the stock strategy:

    * ``__init__``: defaults ``process_group_backend`` to ``"gloo"`` (NCCL is GPU-only) and the DeepSpeed config
      key ``zero_force_ds_cpu_optimizer`` to ``False`` (otherwise offload insists on ``DeepSpeedCPUAdam``, a
      JIT-compiled extension); checks that DeepSpeed really runs on its CPU accelerator.
    * ``setup_environment``: the stock one raises unless the accelerator is CUDA; this one requires CPU.
    * ``setup_distributed``: the stock one checks that device indices equal local ranks, which fails for
      index-less CPU devices; this one skips only that check.
    * ``_init_deepspeed_distributed``: marks DeepSpeed's shared-memory all-reduce op as unavailable first.
      Otherwise creating the communication backend JIT-compiles it (~35 s, needs g++ and ninja), although only
      tensor-parallel inference uses it and falls back to the process group without it.
    * ``root_device``: ``cpu:<local_rank>`` instead of ``cpu``. Lightning passes ``root_device.index`` to
      ``deepspeed.initialize`` as ``device_rank``; DeepSpeed compares it with 0 (``None`` raises ``TypeError``, ``-1``
      would make it assume a world size of 1) and then uses the index-less device name ``"cpu"``. Torch places
      tensors moved to ``cpu:<n>`` on the one CPU device.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(**kwargs)
        assert self.config is not None
        self.config.setdefault("zero_force_ds_cpu_optimizer", False)

        from deepspeed.accelerator import get_accelerator

        ds_device = get_accelerator().device_name()
        if ds_device != "cpu":
            raise SegrouterError(
                f"DeepSpeed was imported with its {ds_device!r} accelerator, so it cannot train on CPU",
                fix="set DS_ACCELERATOR=cpu before deepspeed is first imported (make_deepspeed_strategy does this)",
            )

    @override
    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            raise SegrouterError(
                f"CPUDeepSpeedStrategy needs the CPU accelerator, got {type(self.accelerator).__name__}",
                fix="use make_deepspeed_strategy(), which picks the stock DeepSpeedStrategy on GPUs",
            )
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @override
    def _init_deepspeed_distributed(self) -> None:
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
        super()._init_deepspeed_distributed()

    @property
    @override
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)


def make_deepspeed_strategy(
    stage: int,
    *,
    accelerator: str = "auto",
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    **kwargs: Any,
) -> DeepSpeedStrategy:
    """Build a DeepSpeed ZeRO strategy for the machine at hand.

    Args:
        stage: ZeRO stage, 2 (optimizer state and gradients sharded) or 3 (parameters sharded too).
        accelerator: the Trainer's accelerator; ``"cpu"`` forces the CPU strategy even when CUDA is available.
        offload_optimizer: offload optimizer state and step to CPU.
        offload_parameters: offload parameters to CPU (stage 3 only).
        **kwargs: further keyword arguments of :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.

    Returns:
        The stock :class:`DeepSpeedStrategy` when CUDA is available and ``accelerator`` is not ``"cpu"``, else a
        :class:`CPUDeepSpeedStrategy`. For the latter, ``DS_ACCELERATOR`` defaults to ``"cpu"`` before DeepSpeed is
        imported.

    Raises:
        SegrouterError: ``stage`` is not 2 or 3, or DeepSpeed cannot be imported.
    """
    if stage not in VALID_STAGES:
        raise SegrouterError(
            f"unsupported DeepSpeed ZeRO stage {stage!r}",
            fix=f"use one of {', '.join(map(str, VALID_STAGES))}",
        )
    on_cpu = accelerator == "cpu" or not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401  (imported here so DS_ACCELERATOR is set first)
    except ImportError as err:
        raise SegrouterError(
            f"DeepSpeed cannot be imported ({err})", fix="install or upgrade it with `pip install -U deepspeed`"
        ) from err

    strategy_cls = CPUDeepSpeedStrategy if on_cpu else DeepSpeedStrategy
    return strategy_cls(
        stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters, **kwargs
    )
