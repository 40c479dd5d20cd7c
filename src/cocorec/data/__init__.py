"""Data: raw sources (MovieLens, generic format), the CTR protocol, batches."""

from cocorec.data.errors import DataError
from cocorec.data.protocol import CTRData, FeatureSpec, ProtocolConfig, Split, prepare
from cocorec.data.raw import RawData, load_raw

__all__ = ["CTRData", "DataError", "FeatureSpec", "ProtocolConfig", "RawData", "Split", "load_raw", "prepare"]
