"""Implicit arbitrary-scale decoders: LIIF and its encoder backbones (EDSR, RDN)."""
from vision.decoders.edsr import EDSR, EDSRConfig
from vision.decoders.liif import LIIF, LIIFConfig, from_official, make_coord
from vision.decoders.rdn import RDN, RDNConfig

__all__ = ["EDSR", "EDSRConfig", "LIIF", "LIIFConfig", "RDN", "RDNConfig", "from_official", "make_coord"]
