"""Data: raw sources (MovieLens, generic format), the CTR protocol, batches."""

from cocorec.data.errors import DataError
from cocorec.data.protocol import CTRData, FeatureSpec, ProtocolConfig, Split, prepare
from cocorec.data.raw import MOVIELENS, Domain, NegativeSampling, RawData, load_raw

__all__ = ["CTRData", "DataError", "Domain", "FeatureSpec", "MOVIELENS", "NegativeSampling", "ProtocolConfig",
           "RawData", "Split", "load_raw", "prepare"]
