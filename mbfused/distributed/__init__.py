"""Data parallelism on the engines people use: MicroBatchOptimizer(..., model=ddp_model)
takes over a DistributedDataParallel model's gradient synchronisation (``ddp.py``).

Importing this package registers its adapters with :mod:`mbfused.optim` (``import
mbfused`` does): the optimizer never imports the engines' code itself.
"""

from mbfused.distributed.ddp import DDPSync
from mbfused.optim import register_model_sync

register_model_sync(DDPSync)

__all__ = ["DDPSync"]
