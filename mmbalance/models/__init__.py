"""Model zoo: encoders, fusion modules, heads and :class:`MultimodalModel` (registered builders in
``zoo.py``; dataset-specific canonical models register themselves from their dataset module)."""
from .base import ModelOutput, MultimodalModel
from .encoders import MLPEncoder, SequenceTransformerEncoder
from .fusion import ConcatFusion, TransformerFusion
from .heads import LinearHead, MLPHead, ResidualHead

__all__ = [
    "ModelOutput", "MultimodalModel", "MLPEncoder", "SequenceTransformerEncoder", "ConcatFusion",
    "TransformerFusion", "LinearHead", "MLPHead", "ResidualHead",
]
