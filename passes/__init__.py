"""Built-in passes. Importing this package registers them."""

from effc.passes.block_gates import BlockGates
from effc.passes.bsr_pack import BSRPack
from effc.passes.cleanup import Cleanup
from effc.passes.cure import Cure
from effc.passes.fuse import Fuse
from effc.passes.gqsa_train import GQSATrain
from effc.passes.group_prune import GroupPrune
from effc.passes.kernel_sparsity import KernelSparsity
from effc.passes.layernorm import LayerNorm
from effc.passes.nm_prune import NMPrune
from effc.passes.quantize import Quantize
from effc.passes.quantize_activations import QuantizeActivations
from effc.passes.rearrange import Rearrange
from effc.passes.recover import Recover
from effc.passes.remove_blocks import RemoveBlocks
from effc.passes.share_blocks import ShareBlocks
from effc.passes.tensorrt_legalize import TensorRTLegalize
from effc.passes.tvm_legalize import TVMLegalize
from effc.passes.weight_codes import WeightCodes

__all__ = [
    "BlockGates",
    "BSRPack",
    "Cleanup",
    "Cure",
    "Fuse",
    "GQSATrain",
    "GroupPrune",
    "KernelSparsity",
    "LayerNorm",
    "NMPrune",
    "Quantize",
    "QuantizeActivations",
    "Rearrange",
    "Recover",
    "RemoveBlocks",
    "ShareBlocks",
    "TensorRTLegalize",
    "TVMLegalize",
    "WeightCodes",
]
