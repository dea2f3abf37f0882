"""Quantizers: estimators over plain weight tensors (fit / transform / inverse_transform)."""
from compresskit.quantizers.base import Quantizer, load_quantizer
from compresskit.quantizers.codebook import CodebookLayout, CodebookQuantizer
from compresskit.quantizers.gptq import GPTQ
from compresskit.quantizers.morton import Morton
from compresskit.quantizers.pq import PQ
from compresskit.quantizers.rtn import RTN
from compresskit.quantizers.sizes import SizeReport
from compresskit.quantizers.vq import VQ

__all__ = ["GPTQ", "Morton", "PQ", "RTN", "VQ", "CodebookLayout", "CodebookQuantizer", "Quantizer", "SizeReport", "load_quantizer"]
