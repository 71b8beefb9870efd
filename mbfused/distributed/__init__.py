"""Data parallelism on the engines people use: MicroBatchOptimizer(..., model=model)
takes over the gradient synchronisation of a DistributedDataParallel model (``ddp.py``)
and the sharded gradients of an FSDP2 ``fully_shard`` model (``fsdp.py``).

Importing this package registers its adapters with :mod:`mbfused.optim` (``import
mbfused`` does): the optimizer never imports the engines' code itself.
"""

from mbfused.distributed.ddp import DDPSync
from mbfused.distributed.fsdp import FSDPSync
from mbfused.optim import register_model_sync

register_model_sync(DDPSync)
register_model_sync(FSDPSync)

__all__ = ["DDPSync", "FSDPSync"]
