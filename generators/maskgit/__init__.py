"""MaskGIT: bidirectional masked-token generation (the U-ViT variant ReCAP evaluates with), its plain
sampler, ReCAP, and the importer of the released U-ViT checkpoint."""
